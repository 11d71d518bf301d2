"""
C{cargobay-token}: mint a client token and print it alone on stdout.

Used both as the twistd plugin (C{twistd -n --pidfile= cargobay-token ...}) and
as the console script C{cargobay-token}; both take the same arguments.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from cargobay.config import MIN_SECRET_BYTES, ConfigError, load_config, resolve_config_path
from cargobay.reference import is_valid_name
from cargobay.tokens import MAX_TOKEN_LENGTH, mint_token


class Arguments(usage.Options):
    synopsis = "[--config FILE | --secret SECRET] [--expires-in SECONDS] SUBJECT [REPO[,REPO...]]"
    longdesc = (
        "Print a token for SUBJECT granting pull access to the REPOs (comma separated; "
        "each also grants the names below it), or to every repository when no REPO is given. "
        "The secret is --secret, else [auth] jwt_secret of --config / $CONFIG_PATH / config.toml."
    )
    optParameters = [
        ["config", "c", None, "Config file whose [auth] jwt_secret signs the token."],
        ["secret", "s", None, "The signing secret (instead of a config file)."],
        ["expires-in", "e", None, "Lifetime in seconds (default: no expiry).", int],
    ]

    def parseArgs(self, subject: str, repositories: str | None = None) -> None:  # type: ignore[override]
        if not subject.strip():
            raise usage.UsageError("SUBJECT must not be empty")
        self["subject"] = subject
        if repositories is None:
            self["repositories"] = None
        else:
            names = [name.strip() for name in repositories.split(",") if name.strip()]
            for name in names:
                if not is_valid_name(name):
                    raise usage.UsageError(f"{name!r} is not a valid repository name")
            if not names:
                raise usage.UsageError("REPO list is empty")
            self["repositories"] = names

    def postOptions(self) -> None:
        if self["config"] and self["secret"]:
            raise usage.UsageError("give --config or --secret, not both")
        expires_in = self["expires-in"]
        if expires_in is not None and expires_in <= 0:
            raise usage.UsageError("--expires-in must be a positive number of seconds")
        if self["secret"] is None:
            try:
                config = load_config(resolve_config_path(self["config"]))
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            self["secret"] = config.auth.jwt_secret
            secrets = {config.auth.jwt_secret, *config.auth.previous_jwt_secrets}
            # The proxy requires these claims when its config names them.
            self["issuer"], self["audience"] = config.auth.issuer, config.auth.audience
        elif not self["secret"]:
            raise usage.UsageError("--secret must not be empty")
        else:
            secrets = {self["secret"]}
        if self["subject"] in secrets:
            # The earlier implementation's tool took "<secret> <subject>":
            # the secret would be the subject, in every access line.
            raise usage.UsageError(
                "SUBJECT is a signing secret: give the subject alone (the secret comes from the config, or --secret)"
            )
        size = len(self["secret"].encode("utf-8"))
        if size < MIN_SECRET_BYTES:
            # Taken, as the earlier tool took it; said once, on stderr.
            sys.stderr.write(
                f"cargobay-token: warning: the secret is {size} bytes; HS256 wants at least {MIN_SECRET_BYTES} random ones\n"
            )
        length = len(self.token())
        if length > MAX_TOKEN_LENGTH:
            # cargobay would refuse it, and clients' headers could not carry it.
            raise usage.UsageError(
                f"the token would be {length} bytes, more than the {MAX_TOKEN_LENGTH} cargobay takes: "
                "grant fewer repositories (a name grants the names below it: 'team' grants 'team/app')"
            )

    def token(self) -> str:
        return mint_token(
            self["secret"], self["subject"], self["repositories"], self["expires-in"],
            issuer=self.get("issuer"), audience=self.get("audience"),
        )


class Options(Arguments):
    """C{twistd cargobay-token}'s: a mistake is one line on stderr (not the usage on stdout, where the token goes)."""

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"cargobay-token: {e} (see twistd cargobay-token --help)\n")
            sys.stderr.flush()
            raise SystemExit(2) from None


def makeService(options: Options) -> Any:
    # Not a service: print the token and exit before twistd starts logging,
    # so that stdout holds the token alone.
    sys.stdout.write(options.token() + "\n")
    sys.stdout.flush()
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    options = Arguments()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"usage: cargobay-token {Arguments.synopsis}\ncargobay-token: {e}\n")
        return 2
    sys.stdout.write(options.token() + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
