"""Secrets at rest: Fernet with key rotation (MultiFernet: the first key encrypts, every key decrypts)."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.settings import Settings


class SecretBox:
    def __init__(self, settings: Settings) -> None:
        keys = [k.strip() for k in settings.encryption_keys.get_secret_value().split(",") if k.strip()]
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError) as exc:
            raise ValueError("ENCRYPTION_KEYS: each key must be a url-safe base64 32-byte Fernet key") from exc

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken as exc:
            raise ValueError("stored secret cannot be decrypted with the configured ENCRYPTION_KEYS") from exc

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt under the newest key (run after adding a key in front of ENCRYPTION_KEYS)."""
        return self._fernet.rotate(token)
