"""Credentials for the authentication tests: RSA and P-256 keys, JWTs signed with them (minted here with
`cryptography`, so the gateway's verification is checked against an independent implementation), a JWKS
served over HTTP from a thread (its keys can be rotated, its fetches counted), and API key hashes."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

ISSUER = "https://idp.test.example"
AUDIENCE = "dicom-gateway-test"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or (n.bit_length() + 7) // 8, "big")


class SigningKey:
    """An RS256 or ES256 signing key with its key id."""

    def __init__(self, alg: str, kid: str):
        self.alg, self.kid = alg, kid
        if alg == "RS256":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        numbers = self.key.public_key().public_numbers()
        if self.alg == "RS256":
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                    "n": b64url(_int_bytes(numbers.n)), "e": b64url(_int_bytes(numbers.e))}
        return {"kty": "EC", "kid": self.kid, "use": "sig", "crv": "P-256",
                "x": b64url(_int_bytes(numbers.x, 32)), "y": b64url(_int_bytes(numbers.y, 32))}

    def sign(self, message: bytes) -> bytes:
        if self.alg == "RS256":
            return self.key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        r, s = utils.decode_dss_signature(self.key.sign(message, ec.ECDSA(hashes.SHA256())))
        return _int_bytes(r, 32) + _int_bytes(s, 32)

    def token(self, scope: str = "read search", header: dict | None = None, **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, "scope": scope}
        body.update(claims)
        head = {"alg": self.alg, "kid": self.kid, "typ": "JWT", **(header or {})}
        signed = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(body).encode())}"
        return f"{signed}.{b64url(self.sign(signed.encode()))}"


def unsigned_token(alg: str, signature: bytes = b"", **claims) -> str:
    """A token with `alg` ("none", "HS256"...) that no key of ours signed."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, "scope": "read search", **claims}
    return f"{b64url(json.dumps({'alg': alg}).encode())}.{b64url(json.dumps(body).encode())}.{b64url(signature)}"


class JwksServer:
    """Serves {"keys": [...]} at /jwks.json and counts the fetches."""

    def __init__(self, keys: list[SigningKey]):
        self.keys = list(keys)
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.fetches += 1
                body = json.dumps({"keys": [k.jwk() for k in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
