"""The permission script covers every endpoint, grants what each role should hold and no more,
and billing_perms.py writes rbac's rows idempotently (on both databases)."""
import os
import subprocess
import sys

import pytest

from billing_module.api import HANDLERS
from billing_module.resources import resource_dir, resource_path

WWWROOT = str(resource_dir("wwwroot"))
SCRIPTS = str(resource_dir("scripts"))
sys.path.insert(0, SCRIPTS)
import billing_perms  # noqa: E402

ADMIN_ROLES = {"owner.superuser", "owner.admin", "reseller.admin", "provider.admin", "reseller.operator"}
M = "/billing_module/"


@pytest.fixture(scope="module")
def grants():
    return billing_perms.grants()


def endpoints():
    out = set()
    for root, _, files in os.walk(WWWROOT):
        for name in files:
            if name.endswith((".dspy", ".ui")):
                out.add(M + os.path.relpath(os.path.join(root, name), WWWROOT).replace(os.sep, "/"))
    from billing_module.api.native import FAST_ENDPOINTS
    return out | {f"{M}fast/{name}" for name in FAST_ENDPOINTS}   # the native routes


def generated_paths():
    """What json/build.sh writes (its specs), whether or not the files are present now."""
    out = set()
    for name in os.listdir(resource_dir("json")):
        if name.endswith(".json"):
            t = name[:-5]
            out |= {f"{M}{t}/index.ui", f"{M}{t}/get_{t}.dspy"}
            if t in ("appcodes", "appcodes_kv"):
                out |= {f"{M}{t}/{op}_{t}.dspy" for op in ("add", "update", "delete")}
    return out


def test_every_endpoint_under_wwwroot_is_granted(grants):
    granted = {path for _, path in grants}
    missing = sorted(endpoints() - granted)
    assert not missing, "add these to scripts/setup_billing_perms.sh:\n" + "\n".join(missing)


def test_every_granted_path_exists_or_is_generated(grants):
    stale = sorted({p for _, p in grants} - endpoints() - generated_paths())
    assert not stale, f"setup_billing_perms.sh grants paths that no longer exist: {stale}"
    assert generated_paths() <= {p for _, p in grants}


async def test_roles_hold_what_they_need_and_no_more(grants):
    from tests.test_pages import _registered
    await _registered()
    by_role = {}
    for role, path in grants:
        by_role.setdefault(role, set()).add(path)
    assert set(by_role) == ADMIN_ROLES | {"customer.admin", "customer.user", "any"}
    everything = endpoints() | generated_paths()
    open_paths = by_role["any"]
    for role in ADMIN_ROLES:
        assert by_role[role] | open_paths >= everything, (role, sorted(everything - by_role[role] - open_paths))
    # open to anyone: the login, the health check, the signed sync export and the metrics scrape
    # (an admin key or the scrape token, checked by the endpoint) only
    assert all(p.startswith((M + "login.", M + "logout.", M + "api/health.", M + "sync/", M + "api/metrics.",
                             M + "metrics/")) for p in open_paths), open_paths
    # a customer role reaches no admin-only API, no write but its own keys' (customer.admin), and no
    # page outside the customer area
    key_writes = {f"{M}api/customer_key_create.dspy", f"{M}api/customer_key_revoke.dspy"}
    admin_only = {f"{M}api/{name}.dspy" for name, spec in HANDLERS.items() if spec[3] or "GET" not in spec[1]}
    for role in ("customer.admin", "customer.user"):
        customer = by_role[role]
        assert not customer & (admin_only - key_writes), sorted(customer & admin_only)
        assert not [p for p in customer if p.endswith(".ui") and not p.startswith(M + "my/")]
    assert key_writes <= by_role["customer.admin"] and not key_writes & by_role["customer.user"]


def test_each_native_route_is_granted_to_the_roles_of_its_dspy_path(grants):
    from billing_module.api.native import FAST_ENDPOINTS
    roles_of = {}
    for role, path in grants:
        roles_of.setdefault(path, set()).add(role)
    for name in FAST_ENDPOINTS:
        assert roles_of.get(f"{M}fast/{name}") == roles_of[f"{M}api/{name}.dspy"], name


def test_page_actions_are_held_by_the_roles_of_every_api_they_run(grants):
    """action.ui runs the write APIs it lists: whoever holds it must hold each of them."""
    from tests.test_pages import action_names
    holders = {}
    for role, path in grants:
        holders.setdefault(path, set()).add(role)
    for name in action_names():
        assert holders.get(f"{M}api/{name}.dspy", set()) >= holders[M + "action.ui"], name


def test_setup_script_refuses_to_run_outside_the_host_root(tmp_path):
    r = subprocess.run(["bash", str(resource_path("scripts", "setup_billing_perms.sh"))], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "host root" in r.stderr


_RBAC_TABLES = {
    "permission": "create table if not exists permission (id varchar(32) not null primary key, name varchar(255), "
                  "description varchar(255), parentid varchar(32), path varchar(255), icon varchar(255), "
                  "permtype varchar(255), need_audit varchar(1))",
    "role": "create table if not exists role (id varchar(32) not null primary key, orgtypeid varchar(32), "
            "name varchar(255))",
    "rolepermission": "create table if not exists rolepermission (id varchar(32) not null primary key, "
                      "roleid varchar(32), permid varchar(32))",
    "users": "create table if not exists users (id varchar(32) not null primary key, username varchar(255), "
             "orgid varchar(32))",
    "userrole": "create table if not exists userrole (id varchar(32) not null primary key, userid varchar(32), "
                "roleid varchar(32))",
}


async def _rbac_tables(tx):
    """rbac's tables (the columns its queries read), empty."""
    for ddl in _RBAC_TABLES.values():
        await tx.execute(ddl)
    unique = "create unique index permission_idx1 on permission (path)"
    if tx.dialect == "sqlite":
        unique = unique.replace("index", "index if not exists")
    try:
        await tx.execute(unique)
    except Exception:
        pass   # MySQL has no "if not exists" for indexes; it exists from an earlier test
    for t in _RBAC_TABLES:
        await tx.execute(f"delete from {t}")


async def _drop_rbac_tables(db):
    async with db.transaction() as tx:
        for t in _RBAC_TABLES:
            await tx.execute(f"drop table {t}")


async def test_billing_perms_writes_rbac_rows_idempotently(core, grants):
    async with core.db.transaction() as tx:
        await _rbac_tables(tx)
        # a role the host already has keeps its id
        await tx.execute("insert into role (id, orgtypeid, name) values ('host-role-1', 'owner', 'superuser')")
    try:
        first = await billing_perms.apply(core.db, grants)
        paths = {p for _, p in grants}
        roles = {r for r, _ in grants if r not in billing_perms.LITERAL_ROLES}
        literal = {r for r, _ in grants if r in billing_perms.LITERAL_ROLES}
        assert first == len(paths) + len(literal) + (len(roles) - 1) + len(grants)
        assert await billing_perms.apply(core.db, grants) == 0
        async with core.db.read() as tx:
            assert await tx.scalar("select count(*) as n from permission") == len(paths)
            assert await tx.scalar("select count(*) as n from rolepermission") == len(grants)
            held = await tx.select("select r.orgtypeid, r.name, p.path from rolepermission rp, role r, permission p "
                                   "where rp.roleid = r.id and rp.permid = p.id and r.id = 'host-role-1'")
            assert {h.path for h in held} == {p for r, p in grants if r == "owner.superuser"}
            assert await tx.scalar("select count(*) as n from rolepermission rp, permission p where rp.permid = p.id "
                                   "and rp.roleid = 'any' and p.path = '/billing_module/login.ui'") == 1
    finally:
        await _drop_rbac_tables(core.db)


# --- rbac's permission check, reimplemented from yumoqing/rbac rbac/userperm.py (UserPermissions:
# load_roleperms, get_userroles, get_user_roles, check_roles_path, is_user_has_path_perm) as called by
# rbac/check_perm.py objcheckperm: deny by default; a path is open to a caller when one of the
# caller's roles holds it. Its SQL is rbac's own, run here on the same rows.
async def _rbac_role_paths(tx):
    """load_roleperms: {role key: [paths]}; a role row whose id is a literal role keys by that id."""
    recs = await tx.select("select c.id, c.orgtypeid, c.name, b.path from rolepermission a, permission b, role c "
                           "where a.permid = b.id and c.id = a.roleid order by c.orgtypeid, c.name")
    out = {}
    for r in recs:
        key = r.id if r.id in ("anonymous", "any", "logined") else f"{r.orgtypeid}.{r.name}"
        out.setdefault(key, []).append(r.path)
    return out


async def _rbac_user_roles(tx, userid):
    """get_userroles for a logged-in or header-authenticated user; None is the anonymous caller."""
    if userid is None:
        return ["any", "anonymous"]
    recs = await tx.select("select b.id, b.orgtypeid, b.name from users a, role b, userrole c "
                           "where a.id = c.userid and c.roleid = b.id and a.id = ${userid}$", {"userid": userid})
    roles = ["any", "logined"]
    for r in recs:
        roles += [f"{r.orgtypeid}.{r.name}", f"{r.orgtypeid}.*", f"*.{r.name}"]
    return sorted(set(roles))


def _rbac_check_roles_path(role_paths, roles, path):
    """check_roles_path: exact match, '/main/' stripped, a stored path ending in '**' or '%' is a prefix."""
    normalized = "/" + path[len("/main/"):] if path.startswith("/main/") else path
    for role in roles:
        for perm in role_paths.get(role) or []:
            if perm in (path, normalized):
                return True
            prefix = perm[:-2] if perm.endswith("**") else perm[:-1] if perm.endswith("%") else None
            if prefix and (path.startswith(prefix) or normalized.startswith(prefix)):
                return True
    return False


async def test_rbac_lets_each_caller_reach_exactly_its_grants(core, grants):
    """After billing_perms.py (the grants of setup_billing_perms.sh) on a platform database that has no
    role row "any" yet: the open paths open for an anonymous caller and for a machine caller (an app
    user authenticated by a header, role downapp.logined as dapi grants it), and each role reaches
    exactly its own paths plus the open ones."""
    by_role = {}
    for role, path in grants:
        by_role.setdefault(role, set()).add(path)
    every_path = {p for _, p in grants}
    users = {role: f"user-{i}" for i, role in enumerate(sorted(set(by_role) - {"any"}) + ["downapp.logined"])}
    async with core.db.transaction() as tx:
        await _rbac_tables(tx)
        for role, userid in users.items():
            orgtype, name = role.split(".", 1)
            await tx.execute("insert into role (id, orgtypeid, name) values (${i}$, ${o}$, ${n}$)",
                             {"i": f"r-{userid}", "o": orgtype, "n": name})
            await tx.execute("insert into users (id, username, orgid) values (${i}$, ${i}$, 'org-1')", {"i": userid})
            await tx.execute("insert into userrole (id, userid, roleid) values (${i}$, ${i}$, ${r}$)",
                             {"i": userid, "r": f"r-{userid}"})
    try:
        await billing_perms.apply(core.db)
        async with core.db.read() as tx:
            role_paths = await _rbac_role_paths(tx)
            callers = {"anonymous": await _rbac_user_roles(tx, None)}
            callers.update({role: await _rbac_user_roles(tx, userid) for role, userid in users.items()})
        open_paths = by_role["any"]
        assert open_paths >= {M + "login.ui", M + "api/health.dspy", M + "sync/users.dspy"}
        for caller, roles in callers.items():
            allowed = {p for p in every_path | {M + "no_such_page.ui"} if _rbac_check_roles_path(role_paths, roles, p)}
            assert allowed == open_paths | by_role.get(caller, set()), (caller, sorted(allowed ^ (open_paths | by_role.get(caller, set()))))
    finally:
        await _drop_rbac_tables(core.db)


def test_print_sql_is_the_same_statements():
    out = subprocess.run([sys.executable, str(resource_path("scripts", "billing_perms.py")), "--print-sql"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == len(billing_perms.statements(billing_perms.grants()))
    assert all(ln.startswith("insert into ") and ln.endswith(";") and "${" not in ln for ln in lines)


def test_billing_perms_command_inserts_the_any_role_on_an_sqlite_host_db(tmp_path):
    """The script as an operator runs it (``--db sqlite:///...``) on rbac tables without a role "any"."""
    import sqlite3
    path = tmp_path / "host.db"
    with sqlite3.connect(path) as conn:
        for ddl in _RBAC_TABLES.values():
            conn.execute(ddl)
    out = subprocess.run([sys.executable, str(resource_path("scripts", "billing_perms.py")), "--db", f"sqlite:///{path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("select orgtypeid, name from role where id = 'any'").fetchall() == [("0", "any")]
        open_paths = {p for (p,) in conn.execute("select p.path from rolepermission rp, permission p, role r "
                                                 "where rp.permid = p.id and rp.roleid = r.id and r.id = 'any'")}
    assert "/billing_module/api/health.dspy" in open_paths
