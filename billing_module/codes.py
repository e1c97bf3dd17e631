"""The code tables the models and pages refer to (``appcodes`` / ``appcodes_kv``, the platform's
shape), loaded from ``init/data.json``.

Each model's ``codes`` entry names a list (``cond: "parentid='<list>'"``); generated CRUD pages
and ``/appbase/get_code.dspy`` read the texts from these tables. Loading is an upsert keyed the
way the tables are unique (``appcodes.id``; ``appcodes_kv.(parentid, k)``), so it can run at
every start, and a host whose appbase already holds a list keeps its row ids.
"""
import json

from .errors import ConfigError
from .resources import resource_path


def data_file():
    return str(resource_path("init", "data.json"))


def load_data(path=None):
    """``{"appcodes": [...], "appcodes_kv": [...]}`` from the file, checked: every kv row names
    a list of the file, and (parentid, k) is unique."""
    with open(path or data_file(), encoding="utf-8") as f:
        data = json.load(f)
    lists = {c["id"] for c in data.get("appcodes", [])}
    seen = set()
    for kv in data.get("appcodes_kv", []):
        if kv["parentid"] not in lists:
            raise ConfigError(f"init/data.json: {kv['id']} refers to unknown list {kv['parentid']}")
        key = (kv["parentid"], kv["k"])
        if key in seen:
            raise ConfigError(f"init/data.json: {kv['parentid']}.{kv['k']} appears twice")
        seen.add(key)
    return data


async def load_code_tables(db, path=None):
    """Upsert every list and value of the file. Returns ``{"appcodes": n, "appcodes_kv": m}``,
    the numbers of rows written (inserted or updated)."""
    data = load_data(path)

    async def work(tx):
        n_codes = n_kv = 0
        for c in data.get("appcodes", []):
            row = {"id": c["id"], "name": c.get("name"), "hierarchy_flg": c.get("hierarchy_flg", "0")}
            if not await tx.execute("update appcodes set name = ${name}$, hierarchy_flg = ${hierarchy_flg}$ "
                                    "where id = ${id}$", row):
                await tx.insert("appcodes", row)
            n_codes += 1
        for kv in data.get("appcodes_kv", []):
            row = {"id": kv["id"], "parentid": kv["parentid"], "k": kv["k"], "v": kv.get("v")}
            if not await tx.execute("update appcodes_kv set v = ${v}$ where parentid = ${parentid}$ and k = ${k}$",
                                    row):
                await tx.insert("appcodes_kv", row)
            n_kv += 1
        return {"appcodes": n_codes, "appcodes_kv": n_kv}
    return await db.run(work)
