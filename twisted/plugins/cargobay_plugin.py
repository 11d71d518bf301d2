# Only lazy ServiceMakers here: importing a plugin file must stay cheap.
from twisted.application.service import ServiceMaker

cargobay = ServiceMaker(
    "cargobay",
    "cargobay.server_tap",
    "A read-only pull-through caching proxy for OCI/Docker registries.",
    "cargobay",
)

cargobay_token = ServiceMaker(
    "cargobay-token",
    "cargobay.token_tap",
    "Mint a cargobay client token (a JWT) and print it.",
    "cargobay-token",
)
