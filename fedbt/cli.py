"""The `fedbt` command: data inspection and demo data, central baseline, simulation,
evaluation, prediction, benchmark, and deployment across hospitals (certs, server, site, run)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from fedbt.config import (
    SECTION_SCOPES,
    SITE,
    STRATEGY_NAMES,
    ExperimentConfig,
    describe_validation_error,
    load_config,
    scope_of,
)
from fedbt.data.sites import SliceRule
from fedbt.data.synthetic import ensure_demo_data
from fedbt.fileio import write_json
from fedbt.progress import set_verbose

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_ROOT = Path("demo-data")
DEMO_CONFIG = "configs/demo.yaml"
CPU_CONFIG = "configs/cpu.yaml"
DEFAULT_SITES = ["figshare", "sartaj", "br35h"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], help="YAML config; repeat to layer several")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--data-root",
        help="folder holding the sites' data (e.g. ../shared/data/brain-mri); "
        "default: generated demo data in ./demo-data",
    )
    parser.add_argument("--sites", nargs="+", help="site YAML files (default: sites/figshare, sartaj, br35h)")
    parser.add_argument("--out", help="results folder (default: results/<name>)")


# Command-line flags that are aliases of a dotted setting: applied after the files and --set,
# in the same single validation (so rules between sections see the flags too).
FLAG_KEYS = {
    "data_root": "data.data_root",
    "sites": "data.sites",
    "out": "output_dir",
    "clients": "federated.num_clients",
    "rounds": "federated.rounds",
    "local_epochs": "federated.local_epochs",
    "strategy": "federated.strategy",
    "partition": "federated.partition",
    "alpha": "federated.dirichlet_alpha",
    "ray_address": "federated.ray_address",
    "sites_in_run": "federated.num_clients",
    "min_sites": "federated.min_clients",
    "round_timeout": "federated.round_timeout",
}


def setting_text(value: object) -> str:
    """A flag's value as `--set` takes it: YAML reads a number, a word, a path or a list back as
    itself, and no quote is needed (quotes cannot travel in a deployment's run config)."""
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def flag_overrides(args: argparse.Namespace, keys: dict[str, str] = FLAG_KEYS) -> dict[str, str]:
    """Every flag given, as KEY=VALUE, with the flag as the user typed it."""
    given = {flag: value for flag, value in vars(args).items() if flag in keys and value is not None}
    return {f"{keys[flag]}={setting_text(value)}": f"--{flag.replace('_', '-')} {value}" for flag, value in given.items()}


# `fedbt run`'s flags that are settings of the run (its --out is where the server writes).
RUN_FLAG_KEYS = {flag: FLAG_KEYS[flag] for flag in ("rounds", "sites_in_run", "min_sites", "round_timeout", "strategy")}


def config_from_args(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> ExperimentConfig:
    """The experiment of a command, built once: profile files < --set < flags, validated once."""
    # No config named: the demo profile on demo data, the CPU profile on real data.
    configs = args.config or [DEMO_CONFIG if args.data_root is None else CPU_CONFIG]
    flags = flag_overrides(args)
    overrides = [*args.overrides, *flags, *extra]
    # What depends on other settings: the demo data when no data root is set anywhere, and the
    # results folder named after the experiment.
    partial = load_config(configs, overrides, final=False, origins=flags)
    if partial.data.data_root is None:
        overrides.append(f"data.data_root={json.dumps(str(ensure_demo_data(DEMO_ROOT)))}")
    if not args.out:
        overrides.append(f"output_dir={json.dumps(str(Path(partial.output_dir) / partial.name))}")
    return load_config(configs, overrides, origins=flags)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fedbt.data.catalog import build_catalog
    from fedbt.data.inspect import format_report, inspect_report

    cfg = config_from_args(args)
    report = inspect_report(build_catalog(cfg.data))
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fedbt.data.synthetic import generate_demo_data

    root = generate_demo_data(args.folder, per_class=args.per_class, seed=args.seed)
    print(f"demo data written to {root}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from fedbt.data.catalog import build_catalog
    from fedbt.data.pack import default_pack_path, write_pack
    from fedbt.data.synthetic import is_generated_data

    cfg = config_from_args(args)
    catalog = build_catalog(cfg.data)
    path = Path(args.pack) if args.pack else default_pack_path(cfg.data)
    generated = is_generated_data(cfg.data.data_root)
    digest = write_pack(path, cfg.data, catalog.sites, catalog.records, catalog.problems, catalog.pixels, generated)
    size = path.stat().st_size / 2**20
    print(f"{len(catalog.records)} images of {len(catalog.sites)} sites at {cfg.data.image_size} px: {path} ({size:.1f} MiB)")
    print(f"sha256 {digest} (in {path.name}.sha256); use it as --data-root {path}")
    return 0


def cmd_central(args: argparse.Namespace) -> int:
    from fedbt.data.catalog import build_catalog
    from fedbt.reports.comparison import print_summary_table
    from fedbt.train.central import run_central

    cfg = config_from_args(args)
    result = run_central(cfg, build_catalog(cfg.data), Path(cfg.output_dir), resume=args.resume)
    print_summary_table({"central": result["test"]})
    print(f"central training wall time {result['wall_seconds']:.0f} s; results in {cfg.output_dir}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbt.federated.seeds import run_seed_study
    from fedbt.federated.simulation import run_experiment, run_held_out_study

    set_verbose(args.verbose)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.seeds > 1 and args.skip_central:
        raise ValueError("--seeds compares federated with central at every seed: it cannot skip the central run")
    if args.held_out_site and (args.seeds > 1 or args.skip_central):
        raise ValueError("--held-out-site compares federated with central once: no --seeds, no --skip-central")
    if args.also_strategy and args.seeds < 2:
        raise ValueError("--also-strategy runs beside a seed study: give --seeds N (N at least 2)")
    cfg = config_from_args(args, ("federated.resume=true",) if args.resume else ())
    if cfg.federated.strategy in args.also_strategy:
        raise ValueError(f"--also-strategy {cfg.federated.strategy} is the study's own strategy (federated.strategy)")
    if args.held_out_site:
        sites = held_out_sites(cfg, args.held_out_site)
        results = run_held_out_study(cfg, sites, reuse=not args.no_reuse)
    elif args.seeds > 1:
        results = run_seed_study(
            cfg, args.seeds, skip_local=args.skip_local, reuse=not args.no_reuse, also=args.also_strategy
        )
    else:
        results = run_experiment(
            cfg, skip_central=args.skip_central, skip_local=args.skip_local, reuse=not args.no_reuse
        )
    print(f"report: {Path(cfg.output_dir) / 'report.html'}  (wall time {results['wall_seconds_total']:.0f} s)")
    return 0


def held_out_sites(cfg: ExperimentConfig, choice: str) -> list[str]:
    """--held-out-site: one site, or every site of the run in turn ('all')."""
    from fedbt.data.sites import load_sites

    if choice != "all":
        return [choice]
    return [site.name for site in load_sites(cfg.data.sites, cfg.data.data_root)]


def cmd_personalise(args: argparse.Namespace) -> int:
    from fedbt.federated.seeds import complete_seed_study
    from fedbt.federated.simulation import complete_run

    run = Path(args.run)
    out = Path(args.out) if args.out else run
    if not run.is_dir():
        raise ValueError(f"--run {run}: no such folder")
    # A seed study's folder holds seed-<k>/ folders, each a simulation's.
    complete = complete_seed_study if any(run.glob("seed-*")) else complete_run
    complete(run, out, args.overrides)
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedbt.federated.seeds import report_seed_study

    study = Path(args.run)
    if not study.is_dir():
        raise ValueError(f"--run {study}: no such folder")
    out = Path(args.out) if args.out else study
    report_seed_study(study, out)
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedbt.bench import run_and_print

    if args.device_check:
        from fedbt.bench import device_check

        if not args.out:
            raise ValueError("--device-check writes device-check.json and .md into --out DIR: name it")
        return device_check.run_and_print(args.out, args.quick, args.pack, args.commit)
    if args.round_costs:
        from fedbt.bench import round_costs

        return round_costs.run_and_print(config_from_args(args), args.sim_run)

    return run_and_print(
        config_from_args(args),
        args.steps,
        args.warmup,
        args.images,
        args.sim_run,
        args.profile,
        args.json,
        args.deployment,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedbt.eval.evaluate import EvalRequest, run_evaluation

    scope = args.site or (Path(args.folder).name if args.folder else "pooled")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{scope}"
    request = EvalRequest(
        checkpoint=args.checkpoint,
        compare=args.compare,
        site=args.site,
        folder=args.folder,
        data_root=args.data_root,
        device=args.device,
        resamples=args.bootstrap,
        seed=args.seed,
        slices=args.slices,
        axis=args.axis,
    )
    result = run_evaluation(request, out)
    for name, which in result["data"]["slices_scored"].items():
        print(f"{name}: scored {which}")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedbt.eval.predict import run_predict

    return run_predict(
        args.paths, args.checkpoint, args.gradcam, args.format, args.output, args.device, args.slices, args.axis
    )


def slice_rule(text: str) -> SliceRule:
    """--slices: 'all', or how many slices around the middle of each series or volume."""
    if text == "all":
        return SliceRule(keep="all")
    if text.isdigit() and int(text) > 0:
        return SliceRule(keep="middle", count=int(text))
    raise argparse.ArgumentTypeError(f"{text!r}: 'all' or a number of middle slices, such as 5")


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--slices",
        type=slice_rule,
        default=SliceRule(),
        metavar="all|K",
        help="DICOM series and NIfTI volumes: score all slices or the middle K (default 5)",
    )
    parser.add_argument("--axis", type=int, default=2, choices=[0, 1, 2], help="NIfTI voxel axis to slice across")


def cmd_certs(args: argparse.Namespace) -> int:
    from fedbt.deployment.certs import CertLayout, make_deployment_certs

    # A new deployment gets the three study sites unless told otherwise; a later call (adding a
    # site, renewing the server certificate) makes only what it names.
    new = not CertLayout(Path(args.out)).ca_cert.exists()
    sites = args.sites if args.sites is not None else (DEFAULT_SITES if new else [])
    layout = make_deployment_certs(args.out, args.host, sites, force=args.force, ca_key=args.ca_key)
    print(f"deployment certificates in {layout.root}:")
    if new:
        print(f"  every machine: {layout.ca_cert};  keep {layout.ca_key} offline (only server certificates need it)")
    if args.host:
        print(f"  server machine: {layout.server_cert}, {layout.server_key}")
    for site in sites:
        print(f"  site {site}: {layout.site_private_key(site)};  server machine: {layout.site_public_key(site)}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from fedbt.deployment.nodes import ServerSettings
    from fedbt.deployment.operators import admitted_accounts, control_port_ruleset, current_account, start_server

    if args.print_firewall:
        if not args.operators:
            raise ValueError("--print-firewall needs --operators GROUP, whose members may use the control port")
        admitted = admitted_accounts(args.user or current_account(), args.operators)
        print(control_port_ruleset(args.control_port, admitted), end="")
        return 0
    settings = ServerSettings(
        certs=Path(args.certs),
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        control_port=args.control_port,
        site_keys=Path(args.site_keys) if args.site_keys else None,
    )
    return start_server(settings, args.user, args.operators, args.allow_root)


def cmd_remove_site(args: argparse.Namespace) -> int:
    from fedbt.deployment.certs import CertLayout
    from fedbt.deployment.control import FlowerControl
    from fedbt.deployment.registry import remove_site

    layout = CertLayout(Path(args.certs))
    control = FlowerControl(args.server, layout.ca_cert)
    site_keys = Path(args.site_keys) if args.site_keys else layout.sites_dir
    removed = remove_site(control, args.name, site_keys, layout.removed_dir, Path(args.state_dir))
    print(f"site {args.name} removed: the server refuses its key from now on; the key moved to {removed}")
    return 0


def show_ledger(args: argparse.Namespace) -> int:
    """The site's privacy ledger and test quota, as its operator reads them (nothing is started)."""
    from fedbt.data.sites import load_site
    from fedbt.fl.ledger import data_key, format_ledger
    from fedbt.fl.policy import SiteSetup
    from fedbt.fl.site import SiteFiles, state_folder

    site = load_site(args.site, args.data_root)
    setup = SiteSetup(args.site, site, args.data_root, args.cache_dir)
    cfg = setup.own_experiment()
    files = SiteFiles(state_folder(cfg, setup), 0, data_key(site.name, site.root))
    print(format_ledger(files.ledger, files.quota, site.policy))
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from fedbt.data.sites import load_site
    from fedbt.deployment.nodes import SiteSettings, run_site

    if args.show_ledger:
        return show_ledger(args)
    if not args.server:
        raise ValueError("fedbt site needs --server HOST:PORT (or --show-ledger)")
    site_file = Path(args.site)
    name = load_site(site_file, args.data_root).name
    certs = Path(args.certs)
    settings = SiteSettings(
        site_file=site_file,
        server=args.server,
        ca_cert=Path(args.ca) if args.ca else certs / "ca.pem",
        private_key=Path(args.key) if args.key else certs / "sites" / f"{name}.key",
        data_root=Path(args.data_root) if args.data_root else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        state_dir=Path(args.state_dir or f"deploy-state/site-{name}"),
        runtime_port=args.runtime_port,
        connect_timeout=args.connect_timeout,
        poll_interval=args.poll_interval,
        flower_defaults=args.flower_defaults,
    )
    return run_site(settings)


def cmd_run(args: argparse.Namespace) -> int:
    from fedbt.deployment.runs import RunRequest, run_deployment

    overrides = [*args.overrides, *flag_overrides(args, RUN_FLAG_KEYS)]
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.split(".")[0] in SECTION_SCOPES and scope_of(key) == SITE:
            # A site's own (its data, its split): a deployment's server sends it no site, which would refuse it.
            raise ValueError(f"--set {text}: {key} is each site's own setting (its site file and `fedbt site`), not the server's")
    request = RunRequest(
        server=args.server,
        ca_cert=Path(args.ca),
        out=Path(args.out).resolve(),
        config=args.config,
        overrides=overrides,
        resume=args.resume,
    )
    run_deployment(request)
    return 0


def add_deployment_parsers(sub) -> None:
    certs = sub.add_parser("certs", help="make or extend a deployment's CA, server certificate and site key pairs")
    certs.add_argument("--out", default="certs", help="folder for the certificates and keys (default: certs)")
    certs.add_argument(
        "--host", action="append", default=[], help="server host name or IP address sites connect to (repeatable)"
    )
    certs.add_argument(
        "--sites", nargs="+", help="site key pairs to make (default for a new folder: " + " ".join(DEFAULT_SITES) + ")"
    )
    certs.add_argument(
        "--ca-key", help="the CA's private key, kept offline (default: OUT/ca.key); needed only with --host"
    )
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace the server certificate or site keys named that exist (each holder must get the new ones)",
    )
    certs.set_defaults(func=cmd_certs)

    server = sub.add_parser("server", help="start the Flower SuperLink: TLS, registered sites only")
    server.add_argument("--certs", default="certs", help="the `fedbt certs` folder (server part)")
    server.add_argument(
        "--host", default="127.0.0.1", help="address sites connect to (Fleet API only); 0.0.0.0 for all interfaces"
    )
    server.add_argument("--port", type=int, default=9092, help="the sites' port")
    server.add_argument(
        "--control-port", type=int, default=9093, help="on 127.0.0.1 only: `fedbt run` and site registration"
    )
    server.add_argument("--site-keys", help="folder of <site>.pub to register (default: CERTS/sites)")
    server.add_argument("--state-dir", default="deploy-state/server", help="database (runs, sites) and logs")
    server.add_argument(
        "--user", help="service account the SuperLink, its ServerApps and the front run as (started as root)"
    )
    server.add_argument(
        "--operators", metavar="GROUP", help="Unix group whose members alone (and --user) may use the control port"
    )
    server.add_argument(
        "--allow-root", action="store_true", help="run as root without --user (tests, throw-away containers)"
    )
    server.add_argument(
        "--print-firewall", action="store_true", help="print the control port's nftables rule (for nft -f) and exit"
    )
    server.set_defaults(func=cmd_server)

    remove = sub.add_parser("remove-site", help="on the server: refuse a site's key from now on, and after restarts")
    remove.add_argument("name", help="the site, as its key is named (CERTS/sites/NAME.pub)")
    remove.add_argument(
        "--server", default="127.0.0.1:9093", metavar="HOST:PORT", help="the running server's control port"
    )
    remove.add_argument("--certs", default="certs", help="the `fedbt certs` folder: ca.pem, sites/, removed/")
    remove.add_argument("--site-keys", help="folder the server registers <site>.pub from (default: CERTS/sites)")
    remove.add_argument("--state-dir", default="deploy-state/server", help="the server's state folder")
    remove.set_defaults(func=cmd_remove_site)

    site = sub.add_parser("site", help="start a hospital's SuperNode on its own data")
    site.add_argument("--site", required=True, help="the site's YAML (e.g. sites/figshare.yaml)")
    site.add_argument("--server", metavar="HOST:PORT", help="the server's public address")
    site.add_argument(
        "--show-ledger", action="store_true", help="print the site's privacy ledger and test quota, and exit"
    )
    site.add_argument("--data-root", help="folder the site YAML's relative root resolves against")
    site.add_argument("--certs", default="certs", help="folder with ca.pem and sites/<site>.key")
    site.add_argument("--ca", help="CA certificate (default: CERTS/ca.pem)")
    site.add_argument("--key", help="this site's private key (default: CERTS/sites/<site>.key)")
    site.add_argument("--cache-dir", help="decoded-image cache (default: ~/.cache/fedbt)")
    site.add_argument("--state-dir", help="Flower home and logs (default: deploy-state/site-<site>)")
    site.add_argument(
        "--runtime-port", type=int, help="the site's local Runtime API port (loopback); default: a free one, printed"
    )
    site.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to keep trying the server")
    site.add_argument("--poll-interval", type=float, default=0.2, help="seconds between checks for work")
    site.add_argument(
        "--flower-defaults", action="store_true", help="Flower's own polling and a fresh process per message"
    )
    site.set_defaults(func=cmd_site)

    run = sub.add_parser("run", help="run the federated experiment on a running server and its sites")
    run.add_argument(
        "--server", default="127.0.0.1:9093", metavar="HOST:PORT", help="the server's control port, on its machine"
    )
    run.add_argument("--ca", default="certs/ca.pem", help="CA certificate the server's is signed with")
    run.add_argument("--config", default=DEMO_CONFIG, help="profile inside the project (configs/...)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--rounds", type=int)
    run.add_argument("--sites", dest="sites_in_run", type=int, help="number of sites taking part (default 3)")
    run.add_argument("--min-sites", type=int, help="fewest sites a round may go on with (default: all)")
    run.add_argument("--round-timeout", type=float, help="seconds a round (or the wait for sites) may take")
    run.add_argument("--strategy", choices=STRATEGY_NAMES)
    run.add_argument("--out", default="results/deployment", help="results folder, written by the server")
    run.add_argument("--resume", action="store_true", help="continue from the last round's checkpoint in --out")
    run.set_defaults(func=cmd_run)


def add_simulation_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--clients", type=int, help="number of virtual clients (default 3: one per site)")
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument(
        "--local-epochs", type=float, help="local epochs per round; 0.5 or 0.25: one epoch over 2 or 4 rounds"
    )
    parser.add_argument("--strategy", choices=STRATEGY_NAMES)
    parser.add_argument(
        "--partition",
        choices=["origin", "iid", "dirichlet"],
        help="origin: one client per site (sub-sites when more clients); iid or dirichlet over pooled data",
    )
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration for --partition dirichlet")
    parser.add_argument("--ray-address", help="join an existing Ray cluster (e.g. auto or HOST:6379)")
    parser.add_argument("--skip-central", action="store_true", help="no central baseline")
    parser.add_argument("--skip-local", action="store_true", help="no local-only models")
    parser.add_argument("--no-reuse", action="store_true", help="retrain baselines even if an earlier run matches")
    parser.add_argument("--resume", action="store_true", help="resume the federated run from its last round checkpoint")
    parser.add_argument(
        "--verbose", action="store_true", help="Flower's and Ray's output on the terminal instead of in OUT/flower.log"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat federated and central over this many training seeds (train.seed and the next ones; "
        "the split stays); each in OUT/seed-<seed>/, with mean, sd and the paired gap in OUT/report.html. "
        "Run again into the same OUT, it reuses the seeds finished with the same settings and resumes the others",
    )
    parser.add_argument(
        "--also-strategy",
        action="append",
        default=[],
        choices=STRATEGY_NAMES,
        metavar="STRATEGY",
        help="with --seeds: also federate under this global strategy at every seed (repeatable), into "
        "OUT/seed-<seed>/federated-<strategy>/, reported against the same seeds' central model",
    )
    parser.add_argument(
        "--held-out-site",
        metavar="SITE",
        help="leave this site out (or 'all': each in turn): federate the others, train central on the same "
        "sites, score both on the held-out site's test split; each in OUT/held-out-<site>/",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbt", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (also FEDBT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate data").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", help="per-site counts, image summary, duplicate and leakage report")
    add_config_arguments(inspect)
    inspect.add_argument("--json", help="also write the report as JSON here")
    inspect.set_defaults(func=cmd_inspect)
    demo = data.add_parser("demo", help="write synthetic MRI-like demo data in the real layouts")
    demo.add_argument("folder")
    demo.add_argument("--per-class", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    pack = data.add_parser("pack", help="the sites' decoded images in one checksummed file, usable as --data-root")
    add_config_arguments(pack)
    pack.add_argument("pack", nargs="?", help="the pack file, *.npz (default: packs/<data root>-<size>px.npz)")
    pack.set_defaults(func=cmd_pack)

    central = sub.add_parser("central", help="train the central baseline on the pooled training splits")
    add_config_arguments(central)
    central.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    central.set_defaults(func=cmd_central)

    simulate = sub.add_parser("simulate", help="federated simulation + central and local-only baselines + report")
    add_simulation_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)
    personalise = sub.add_parser(
        "personalise",
        help="personalised site models and the federated-vs-central McNemar test for a finished simulation "
        "(or every finished seed of a seed study), from its final models; then its report again",
    )
    personalise.add_argument("--run", required=True, help="a finished simulation's folder, or a seed study's")
    personalise.add_argument("--out", help="results folder (default: the run's own)")
    personalise.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the run's, e.g. --set personalise.epochs=2 (repeatable)",
    )
    personalise.set_defaults(func=cmd_personalise)
    report = sub.add_parser(
        "report",
        help="a seed study's report over the seeds it has finished so far, while it runs; trains nothing",
    )
    report.add_argument("--run", required=True, help="the seed study's folder (run_simulation.py --seeds N --out)")
    report.add_argument("--out", help="where report.md, report.html and seeds.json go (default: the study's folder)")
    report.set_defaults(func=cmd_report)

    bench = sub.add_parser("bench", help="training, evaluation and inference speed on this machine")
    add_config_arguments(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed reference steps and latency repeats")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps (batches) before each timing")
    bench.add_argument("--images", type=int, default=512, help="images in the timed engine epoch")
    bench.add_argument("--sim-run", help="a finished simulation's output folder: report its federated overhead")
    bench.add_argument("--profile", action="store_true", help="profile a few engine steps; Chrome trace in --out")
    bench.add_argument("--json", help="also write every number as JSON here")
    bench.add_argument(
        "--deployment",
        choices=["tuned", "flower-defaults", "both"],
        help="also measure a loopback deployment's per-round overhead (server + a SuperNode per site)",
    )
    bench.add_argument(
        "--device-check",
        action="store_true",
        help="the lent-GPU check instead (scripts/device_check.sh): engine, latency, concurrent clients, "
        "the whole experiment; results in --out",
    )
    bench.add_argument(
        "--round-costs",
        action="store_true",
        help="instead: time each fixed piece of a simulation round (with --sim-run: beside its measured overhead)",
    )
    bench.add_argument("--quick", action="store_true", help="with --device-check: the same steps at tiny sizes")
    bench.add_argument("--pack", help="with --device-check: the pack of real images (default: packs/brain-mri-128px.npz)")
    bench.add_argument("--commit", help="with --device-check: the commit to report where the tree has no .git")
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser("evaluate", help="clinical metrics, calibration, CIs, plots and report of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a fedbt checkpoint (final.pt, last.pt, ...)")
    evaluate.add_argument("--compare", metavar="CHECKPOINT", help="second checkpoint: McNemar test on the same images")
    scope = evaluate.add_mutually_exclusive_group()
    scope.add_argument("--site", help="this site's test split (default: the pooled test split)")
    scope.add_argument(
        "--folder", help="a folder of class folders (glioma/, no_tumor/, yes/, ...) of images, DICOM or NIfTI instead"
    )
    evaluate.add_argument("--data-root", help="folder holding the sites' data (default: the checkpoint's)")
    evaluate.add_argument("--out", help="output folder (default: eval-<scope> beside the checkpoint)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    add_slice_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predict image files or folders with a checkpoint")
    predict.add_argument(
        "paths", nargs="+", help="image files (.jpg, .png, ..., .mat), DICOM (.dcm), NIfTI (.nii, .nii.gz) or folders"
    )
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--gradcam", metavar="DIR", help="write a Grad-CAM overlay per image here")
    predict.add_argument("--format", default="json", choices=["json", "csv"])
    predict.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_slice_arguments(predict)
    predict.set_defaults(func=cmd_predict)
    add_deployment_parsers(sub)
    return parser


def keep_output_writable() -> None:
    """Print any file name: one that is not valid UTF-8 reaches Python as lone surrogates, which a
    strict stdout cannot encode; they are written as \\u.. escapes instead of failing all output."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def raised_by_fedbt(err: BaseException) -> bool:
    """Whether fedbt's own code raised it (a message meant for the user), not a library it called
    (a shape error in torch, CUDA out of memory: those keep their traceback)."""
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def main(argv: list[str] | None = None) -> int:
    keep_output_writable()
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FEDBT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except ValidationError as err:  # a setting assigned in code: name the setting, on one line
        if debug:
            raise
        print(f"fedbt: error: {describe_validation_error(err, err.title)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as err:  # a CheckpointError is a ValueError
        if debug or not raised_by_fedbt(err):
            raise
        print(f"fedbt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
