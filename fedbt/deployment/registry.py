"""The sites a server has registered, by the node id Flower gave each site's key; removing a site.

`fedbt server` registers every `<site>.pub` of its keys folder when it starts and records the node
id the SuperLink answers (NODE_IDS in its state folder, beside the SuperLink's database, which keeps
the registrations). `fedbt remove-site NAME` unregisters that node at the running SuperLink, which
refuses the key from its next request on, and moves the key out of the keys folder, so that a
restart does not register it again. Flower keeps an unregistered key in its database and never
registers it again: a site that comes back gets a new key pair.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedbt.deployment.certs import registered_keys
from fedbt.deployment.control import FlowerControl
from fedbt.deployment.processes import DeploymentError
from fedbt.fileio import read_json, write_json

NODE_IDS = "site-nodes.json"


def node_ids(state_dir: Path) -> dict[str, int]:
    """{site name: node id} of the sites this server registered."""
    return read_json(state_dir / NODE_IDS) or {}


def register_sites(control: FlowerControl, site_keys: Path, state_dir: Path) -> dict[str, str]:
    """Register every `<site>.pub` in `site_keys`: {site: 'registered' or 'already registered'}."""
    keys = registered_keys(site_keys)
    if not keys:
        raise DeploymentError(f"no site public keys (<site>.pub) in {site_keys}: make them with `fedbt certs`")
    ids, states = node_ids(state_dir), {}
    for name, key in keys.items():
        node_id = control.register_site(name, key)
        if node_id is not None:
            ids[name] = node_id
        states[name] = "already registered" if node_id is None else "registered"
    write_json(state_dir / NODE_IDS, ids)
    return states


def remove_site(control: FlowerControl, name: str, site_keys: Path, removed_dir: Path, state_dir: Path) -> Path:
    """Unregister the site's node at the running server, then move its key to `removed_dir`; where it went.

    Checked before anything changes: the key is in the keys folder and the server recorded its node.
    """
    keys = registered_keys(site_keys)
    if name not in keys:
        raise DeploymentError(f"no site {name!r} in {site_keys} (its sites: {', '.join(keys) or 'none'})")
    ids = node_ids(state_dir)
    if name not in ids:
        raise DeploymentError(
            f"{state_dir / NODE_IDS} records no node for site {name!r}: is this the state folder of the "
            f"`fedbt server` that registered {keys[name]}?"
        )
    control.unregister_site(ids[name])
    removed_dir.mkdir(parents=True, exist_ok=True)
    # Named with the node id: a site removed, given a new key and removed again keeps both keys on record.
    removed = Path(shutil.move(keys[name], removed_dir / f"{name}-{ids[name]}.pub"))
    write_json(state_dir / NODE_IDS, {site: node for site, node in ids.items() if site != name})
    return removed
