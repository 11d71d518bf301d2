from cargobay.challenge import find_challenge, parse_challenges


def test_docker_hub_challenge():
    [c] = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scope == "repository:library/alpine:pull"


def test_several_challenges_and_spacing():
    challenges = parse_challenges('Basic realm="r1" , Bearer realm="https://x/t", service=reg, scope="a:b:pull,push"')
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[1].service == "reg"
    assert challenges[1].scope == "a:b:pull,push"


def test_quoted_escapes():
    [c] = parse_challenges(r'Basic realm="say \"hi\""')
    assert c.realm == 'say "hi"'


def test_malformed_headers_do_not_raise():
    for header in ["", "=", '"', "Bearer realm=", 'Bearer realm="unterminated', ",,,", "Bearer ,,,realm=x"]:
        parse_challenges(header)


def test_find_challenge_across_headers():
    found = find_challenge(['Basic realm="x"', 'Bearer realm="https://t"'], "bearer")
    assert found is not None and found.realm == "https://t"
    assert find_challenge(["Negotiate"], "bearer") is None
