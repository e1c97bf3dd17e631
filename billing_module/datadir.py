"""Files the module keeps in its data directory (``server.data_dir``), below every other module:
the standalone host, the auth layer and the CLI all read their secrets through here."""
import os
import secrets


def secret_file(data_dir: str, name: str, nbytes: int = 24) -> str:
    """A secret generated once and kept in data_dir (mode 600)."""
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        os.chmod(path, 0o600)     # one an older version left readable to others
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    value = secrets.token_urlsafe(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
