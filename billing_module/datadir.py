"""Files the module keeps in its data directory (``server.data_dir``), below every other module:
the standalone host, the auth layer and the CLI all read their secrets through here."""
import os
import secrets
import tempfile


def secret_file(data_dir: str, name: str, nbytes: int = 24) -> str:
    """A secret generated once and kept in data_dir (mode 600). Two processes starting on one
    data directory agree on it: the secret is written whole to a private file and linked into
    place, so the one that loses the race reads the winner's complete value."""
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.")   # mode 600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(nbytes) + "\n")
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    os.chmod(path, 0o600)     # one an older version left readable to others
    with open(path, encoding="utf-8") as f:
        return f.read().strip()
