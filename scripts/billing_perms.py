"""Register billing_module's paths for the platform roles directly in rbac's tables, for hosts
that do not have ``set_role_perm.py``. The grants are exactly those of
``setup_billing_perms.sh`` (the one list of paths and roles): this script runs it with a
stand-in ``set_role_perm.py`` that records each (role, path) instead of writing it.

Rows written (rbac's shape): ``permission(id, name, path)`` one per path (path is unique),
``role(id, orgtypeid, name)`` when a role is missing, ``rolepermission(id, roleid, permid)`` one
per grant. Every statement inserts only what is missing, so running it again changes nothing.

The literal roles ``any``, ``logined`` and ``anonymous`` are granted the way the platform's
``set_role_perm.py`` grants them: ``rolepermission.roleid`` is the literal id. rbac loads the grants
with an inner join of ``rolepermission`` on ``role`` (yumoqing/rbac ``rbac/userperm.py``,
``load_roleperms``) and keys a row whose ``role.id`` is ``any`` as the role ``any``: without a
``role`` row of that id the grant is invisible and the open paths (login, health, the signed
``/sync/`` export) are refused to everyone. So the row ``role(id='any', orgtypeid='0', name='any')``
(``'0'``: the role model's default org type) is inserted when no role of that id exists.

    python scripts/billing_perms.py --print-sql                 # the SQL, to review or run by hand
    python scripts/billing_perms.py --db mysql://root@127.0.0.1:3306/sage
    python scripts/billing_perms.py --db sqlite:///path/to/host.db

Restart the host afterwards (rbac caches role permissions).
"""
import argparse
import asyncio
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SETUP_SCRIPT = os.path.join(HERE, "setup_billing_perms.sh")
LITERAL_ROLES = ("any", "logined", "anonymous")

# stands in for `python set_role_perm.py ROLE PATH`: records the grant (a shell script, because
# the setup script makes hundreds of calls)
_RECORDER = """#!/usr/bin/env bash
[ "$1" = set_role_perm.py ] || {{ echo "unexpected call: python $*" >&2; exit 2; }}
printf '%s %s\\n' "$2" "$3" >> {out}
"""


def grants(script=SETUP_SCRIPT):
    """[(role, path)] in the order setup_billing_perms.sh grants them, duplicates removed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grants.txt")
        open(os.path.join(tmp, "set_role_perm.py"), "w").close()   # the setup script checks it is there
        bindir = os.path.join(tmp, "bin")
        os.mkdir(bindir)
        recorder = os.path.join(bindir, "python")
        with open(recorder, "w", encoding="utf-8") as f:
            f.write(_RECORDER.format(out=shlex.quote(out)))
        os.chmod(recorder, 0o755)
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        subprocess.run(["bash", script], cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as f:
            pairs = [tuple(line.split(" ", 1)) for line in f.read().splitlines() if line]
    seen, result = set(), []
    for role, path in pairs:
        if (role, path) not in seen:
            seen.add((role, path))
            result.append((role, path))
    return result


def _id(*parts):
    # deterministic ids: the same grant always has the same row id on every host
    return "bm" + hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:30]


def statements(pairs):
    """[(sql with ${name}$ parameters, params)], each inserting only what is missing."""
    out, paths, roles = [], [], []
    for role, path in pairs:
        if path not in paths:
            paths.append(path)
        if role not in LITERAL_ROLES and role not in roles:
            roles.append(role)
    for path in paths:
        out.append(("insert into permission (id, name, path) select ${id}$, ${name}$, ${path}$ from (select 1 as one_) one_ "
                    "where not exists (select 1 from permission where path = ${path}$)",
                    {"id": _id("perm", path), "name": path.rsplit("/", 1)[-1][:255], "path": path}))
    for role in dict.fromkeys(r for r, _ in pairs if r in LITERAL_ROLES):
        out.append(("insert into role (id, orgtypeid, name) select ${id}$, '0', ${id}$ from (select 1 as one_) one_ "
                    "where not exists (select 1 from role where id = ${id}$)", {"id": role}))
    for role in roles:
        orgtype, name = role.split(".", 1)
        out.append(("insert into role (id, orgtypeid, name) select ${id}$, ${orgtype}$, ${name}$ from (select 1 as one_) one_ "
                    "where not exists (select 1 from role where orgtypeid = ${orgtype}$ and name = ${name}$)",
                    {"id": _id("role", role), "orgtype": orgtype, "name": name}))
    for role, path in pairs:
        ns = {"id": _id("grant", role, path), "path": path}
        if role in LITERAL_ROLES:
            ns["role"] = role
            out.append(("insert into rolepermission (id, roleid, permid) select ${id}$, ${role}$, p.id from permission p "
                        "where p.path = ${path}$ and not exists (select 1 from rolepermission rp "
                        "where rp.roleid = ${role}$ and rp.permid = p.id)", ns))
        else:
            ns["orgtype"], ns["name"] = role.split(".", 1)
            out.append(("insert into rolepermission (id, roleid, permid) select ${id}$, r.id, p.id from role r, permission p "
                        "where r.orgtypeid = ${orgtype}$ and r.name = ${name}$ and p.path = ${path}$ and not exists "
                        "(select 1 from rolepermission rp where rp.roleid = r.id and rp.permid = p.id)", ns))
    return out


def _literal(value):
    return "'" + str(value).replace("'", "''") + "'"   # the paths and roles hold no backslashes


def render_sql(stmts):
    """The statements with their values inlined as quoted literals (for review / mysql client)."""
    import re
    lines = []
    for sql, ns in stmts:
        lines.append(re.sub(r"\$\{(\w+)\}\$", lambda m: _literal(ns[m.group(1)]), sql) + ";")
    return "\n".join(lines) + "\n"


async def apply(db, pairs=None):
    """Write the grants through a billing_module ``Database`` (one transaction). Returns the number
    of rows inserted (0 when everything was there)."""
    stmts = statements(pairs if pairs is not None else grants())

    async def work(tx):
        n = 0
        for sql, ns in stmts:
            n += await tx.execute(sql, ns)
        return n
    return await db.run(work)


def _database(url):
    checkout = os.path.dirname(HERE)
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")):
        sys.path.insert(0, checkout)   # a checkout that is not installed; a wheel keeps this file in the package
    from billing_module.db.database import Database, mysql_desc, sqlite_desc
    u = urllib.parse.urlparse(url)
    if u.scheme == "sqlite":
        return Database(sqlite_desc(u.path))
    if u.scheme == "mysql":
        return Database(mysql_desc(u.hostname or "127.0.0.1", u.port or 3306, urllib.parse.unquote(u.username or "root"),
                                   urllib.parse.unquote(u.password or ""), u.path.lstrip("/")))
    raise SystemExit(f"--db: expected mysql://user[:password]@host[:port]/db or sqlite:///file, not {url}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--print-sql", action="store_true", help="print the SQL instead of running it")
    group.add_argument("--db", help="the rbac database: mysql://user[:password]@host[:port]/db or sqlite:///file")
    args = ap.parse_args(argv)
    if args.print_sql:
        sys.stdout.write(render_sql(statements(grants())))
        return 0

    async def run():
        db = _database(args.db)
        try:
            return await apply(db)
        finally:
            await db.close()
    n = asyncio.run(run())
    print(f"billing_module permissions: {n} rows inserted; restart the host so rbac reloads them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
