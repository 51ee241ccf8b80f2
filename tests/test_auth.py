"""Tokens: HS256 in dev, JWKS (RS256/ES256) in production; 401s carry JSON bodies."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dropserver.auth import Role, TokenVerifier, issue_token
from dropserver.errors import Unauthorized
from dropserver.settings import load_settings


async def test_guest_and_signed_in(http, make_token):
    assert (await http.get("/v1/me")).json()["guest"] is True
    token = make_token("alice", Role.CREATOR, name="Alice")
    body = (await http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).json()
    assert body == {"guest": False, "user_id": "alice", "role": "creator", "name": "Alice",
                    "avatar_url": "", "moderator_of": []}


@pytest.mark.parametrize("case", ["forged", "expired", "wrong_audience", "garbage", "scheme"])
async def test_bad_tokens_get_401_with_json(http, settings, case):
    if case == "forged":
        other = settings.replace(jwt_secret="not-the-secret-but-long-enough-for-hs256")
        token = issue_token(other, "mallory")
        code = "token_invalid"
    elif case == "expired":
        token = issue_token(settings, "bob", ttl=60, now=time.time() - 3600)
        code = "token_expired"
    elif case == "wrong_audience":
        token = issue_token(settings, "bob", audience="someone-else")
        code = "token_wrong_audience"
    elif case == "garbage":
        token = "not.a.jwt"
        code = "token_invalid"
    else:
        token = None
        code = "token_invalid"
    headers = ({"Authorization": f"Bearer {token}"} if token
               else {"Authorization": "Basic dXNlcjpwYXNz"})
    resp = await http.get("/v1/me", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    err = resp.json()["error"]
    assert err["code"] == code
    assert err["message"]
    assert err["details"] == {}


async def test_unknown_role_is_rejected(settings):
    token = jwt.encode({"sub": "x", "role": "overlord", "aud": "dropserver",
                        "exp": int(time.time()) + 60}, settings.effective_jwt_secret)
    with pytest.raises(Unauthorized, match="unknown role"):
        await TokenVerifier(settings).verify(token)


async def test_each_verifier_checks_tokens_against_its_own_secret(settings):
    """HS256 secrets are prepared once per verifier (dropserver.auth._PreparedHMAC), not
    once per token: two verifiers with different secrets in one process still each
    accept only their own tokens, token after token."""
    other = settings.replace(jwt_secret="another-secret-that-is-long-enough-for-hs256")
    mine, theirs = TokenVerifier(settings), TokenVerifier(other)
    for _ in range(3):
        assert (await mine.verify(issue_token(settings, "alice"))).user_id == "alice"
        assert (await theirs.verify(issue_token(other, "bob"))).user_id == "bob"
        for verifier, token in ((mine, issue_token(other, "bob")),
                                (theirs, issue_token(settings, "alice"))):
            with pytest.raises(Unauthorized) as info:
                await verifier.verify(token)
            assert info.value.code == "token_invalid"
    expired = issue_token(settings, "carol", ttl=60, now=time.time() - 3600)
    with pytest.raises(Unauthorized) as info:
        await mine.verify(expired)
    assert info.value.code == "token_expired"


class _Jwks:
    """A JWKS endpoint on loopback, as an identity provider serves it."""

    def __init__(self, jwks: dict) -> None:
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_jwks_tokens(alg):
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS256"
           else ec.generate_private_key(ec.SECP256R1()))
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "use": "sig", "alg": alg})
    idp = _Jwks({"keys": [jwk]})
    try:
        settings = load_settings({}, jwks_url=idp.url, jwt_issuer="https://idp.example",
                                 stripe_api_key="sk_test_x", stripe_webhook_secret="whsec_x")
        verifier = TokenVerifier(settings)
        claims = {"sub": "user_2abc", "role": "creator", "aud": "dropserver",
                  "iss": "https://idp.example", "exp": int(time.time()) + 60}
        good = jwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})
        who = await verifier.verify(good)
        assert (who.user_id, who.role) == ("user_2abc", Role.CREATOR)

        other = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                 if alg == "RS256" else ec.generate_private_key(ec.SECP256R1()))
        forged = jwt.encode(claims, other, algorithm=alg, headers={"kid": "k1"})
        with pytest.raises(Unauthorized) as info:
            await verifier.verify(forged)
        assert info.value.code == "token_invalid"

        wrong_iss = jwt.encode({**claims, "iss": "https://evil.example"}, key,
                               algorithm=alg, headers={"kid": "k1"})
        with pytest.raises(Unauthorized) as info:
            await verifier.verify(wrong_iss)
        assert info.value.code == "token_wrong_issuer"

        # An HS256 token signed with the public key must never pass (alg confusion).
        hs = jwt.encode(claims, "whatever-secret-that-is-32-bytes-long", algorithm="HS256",
                        headers={"kid": "k1"})
        with pytest.raises(Unauthorized):
            await verifier.verify(hs)
    finally:
        idp.close()
