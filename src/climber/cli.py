"""The one command line: ``climber data|train|eval|compare|tune|bench|flops|scale|serve|quickstart|models ...``.

Errors a user can act on (DataError, ConfigError, a missing file) print one line and exit with code 2;
set CLIMBER_DEBUG=1 to see the traceback instead. Other exceptions keep their traceback (a ValueError from
inside climber is a bug, not bad input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from climber import __version__
from climber.config import ConfigError
from climber.data.schema import TS_UNITS, DataError

USER_ERRORS = (DataError, ConfigError, FileNotFoundError)  # a ValueError of the library is a bug: traceback


def _data_prepare(args) -> None:
    from climber.data.datasets import DATASETS, load_dataset
    from climber.data.prepare import prepare
    from climber.data.readers import parse_column_map, parse_separator, scan_table
    from climber.data.schema import LabelRule, RawSource

    if args.source_name in DATASETS:
        if args.columns or args.label or args.ts_unit:
            raise DataError(f"{args.source_name} is a named data set with its own columns, label rule and time "
                            "stamps; --columns/--label/--ts-unit are for CSV/Parquet paths")
        source = load_dataset(args.source_name, Path(args.source) if args.source else None)
    else:
        path = Path(args.source_name)
        if not path.exists():
            raise DataError(f"{path}: no such file, and not a named data set ({', '.join(DATASETS)})")
        if not args.label:
            raise DataError("a CSV/Parquet source needs --label, e.g. --label 'action>=4' or --label 'action in cart,fav,buy'")
        names = args.names.split(",") if args.names else None
        frame = scan_table(path, columns=parse_column_map(args.columns), names=names,
                           separator=parse_separator(args.separator), has_header=names is None)
        actions = tuple(args.actions.split(",")) if args.actions else None
        source = RawSource(path.name, frame, LabelRule.parse(args.label), actions=actions, files=(path,),
                           ts_unit=args.ts_unit or "s")
    source = _with_feature_options(source, args)
    manifest = prepare(source, Path(args.out), force=args.force)
    _print_manifest(manifest, args.out)


def _with_feature_options(source, args):
    """``source`` with the feature options of ``data prepare``: a user table joined, bag columns, time
    context to derive, the fill of missing numbers."""
    import dataclasses

    from climber.data.readers import drop_columns, join_user_table, parse_separator, read_user_table

    frame, files = source.frame, source.files
    if args.user_table:
        separator = parse_separator(args.user_separator or args.separator)
        frame = join_user_table(frame, read_user_table(Path(args.user_table), args.user_key, separator))
        files += (Path(args.user_table),)
    elif args.user_key != "user" or args.user_separator:
        raise DataError("--user-key / --user-separator go with --user-table")
    before = set(frame.collect_schema().names())
    if args.drop:
        frame = drop_columns(frame, _names(args.drop))
    dropped = before - set(frame.collect_schema().names())
    bags = tuple(c for c in (*source.multi_columns, *_names(args.multi)) if c not in {*_names(args.single), *dropped})
    return dataclasses.replace(source, frame=frame, files=files, multi_columns=bags, multi_separator=args.multi_separator,
                               derive=tuple(_names(args.derive)), tz=args.tz, fill=args.fill)


def _names(text: str | None) -> list[str]:
    """A comma separated option's names, stripped, empty ones left out ([] when the option is not given)."""
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _print_manifest(m: dict, where) -> None:
    print(f"prepared {where}: {m['rows']:,} events, {m['users']:,} users, {m['items']:,} items, "
          f"positive rate {m['positive_rate']:.3f}, label rule '{m['label_rule']}'")
    for split in ("train", "val", "test"):
        s = m["splits"].get(split, {"rows": 0, "users": 0, "positive_rate": None})
        rate = "-" if s["positive_rate"] is None else f"{s['positive_rate']:.3f}"
        print(f"  {split:5s} {s['rows']:>10,} events  {s['users']:>8,} users  positive rate {rate}")
    if "bayes" in m:
        from climber.data.synthetic import ceiling_text

        print(f"  test {ceiling_text(m['bayes']['test'])}")
    for note in m.get("notes", []):
        print(f"  note: {note}")
    for warning in m.get("warnings", []):
        print(f"climber: warning: {warning}", file=sys.stderr)
    print(f"  fingerprint sha256 {m['fingerprint']['sha256']}")


def _data_synth(args) -> None:
    given = {k: v for k, v in (("users", args.users), ("items", args.items)) if v is not None}  # else the generator's
    if args.kind == "lifelong":
        from climber.data.lifelong import synthesize_lifelong

        m = synthesize_lifelong(Path(args.out), **given, median_events=args.median_events, artists=args.artists,
                                genres=args.genres, seed=args.seed, force=args.force)
    else:
        from climber.data.synthetic import synthesize

        m = synthesize(Path(args.out), **given, events_per_user=args.events_per_user, topics=args.topics,
                       seed=args.seed, force=args.force)
    _print_manifest(m, args.out)


def _data_info(args) -> None:
    from climber.data.prepare import load_manifest

    m = load_manifest(Path(args.dir))
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        _print_manifest(m, args.dir)


def _data_shard(args) -> None:
    from climber.train.distributed import write_shards

    out = Path(args.out) if args.out else Path(args.data) / f"shards-{args.shards}"
    info = write_shards(Path(args.data), out, args.shards, force=args.force)
    print(f"wrote {info['shards']} shards ({sum(info['rows']):,} events, {sum(info['users']):,} users) to {out}")


def _overrides(args) -> list[str]:
    """--set items, and train.device from --device when given (checked against this machine now: a
    ConfigError, exit 2, before any run starts)."""
    if args.device is None:
        return list(args.set or [])
    from climber.devices import resolve_device

    resolve_device(args.device)
    return [*(args.set or []), f"train.device={args.device}"]


def _train_argv(args) -> list[str]:
    """This ``climber train`` command line without --nproc: what each launched process runs."""
    argv = ["train", "--data", args.data, "--out", args.out]
    for flag, value in (("--model", args.model), ("--config", args.config), ("--shards", args.shards)):
        if value:
            argv += [flag, value]
    for item in _overrides(args):
        argv += ["--set", item]
    return argv + [flag for flag, on in (("--resume", args.resume), ("--no-progress", args.no_progress),
                                         ("--json", args.json)) if on]


def _train(args) -> None:
    from climber.config import resolve
    from climber.train import distributed
    from climber.train.loop import Trainer

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = resolve(args.model, Path(args.config) if args.config else None, _overrides(args))
    out = Path(args.out)
    fresh = not out.exists() or not any(out.iterdir())
    if not fresh and not args.resume:
        raise ConfigError(f"{out}: run dir exists and is not empty; use --resume to continue it or pick another --out")
    if args.nproc > 1 and not distributed.launched():  # the shortcut for torchrun --standalone
        distributed.rank_batch_size(cfg.train.batch_size, args.nproc)  # fail before starting processes
        try:
            with _removed_without_checkpoint(out, fresh):
                distributed.launch(args.nproc, _train_argv(args))
        except distributed.DistributedError as e:
            last = out / "checkpoints" / "last.safetensors"
            kept = (f"{last} (epoch {_checkpoint_epoch(last)}) is intact; continue with --resume (any --nproc)"
                    if last.exists() else "no checkpoint was written yet")
            print(f"climber: error: {e}; {kept}", file=sys.stderr)
            raise SystemExit(1) from None
        return
    dist = distributed.init_from_env()
    try:
        with _removed_without_checkpoint(out, fresh and dist.main):
            trainer = Trainer(out, Path(args.data), cfg, log=_flushed_print if dist.main else (lambda *_: None),
                              progress=not args.no_progress and dist.main, dist=dist,
                              shards=Path(args.shards) if args.shards else None)
            metrics = trainer.fit(resume=args.resume)
    except RuntimeError as e:  # a collective failed: another process has died (torchrun names it)
        if dist.world == 1 or os.environ.get("CLIMBER_DEBUG"):
            raise
        print(f"climber: error: rank {dist.rank}: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        distributed.shutdown()
    if dist.main:
        print(json.dumps({k: metrics[k] for k in ("best", "last")}, indent=2) if args.json else f"run dir: {out}")
    if dist.world > 1:
        distributed.exit_finished_rank()


@contextlib.contextmanager
def _removed_without_checkpoint(out: Path, remove: bool):
    """With ``remove`` (a new run): a run that fails, or is interrupted, before its first checkpoint takes
    its run dir with it, so the dir does not block the rerun."""
    try:
        yield
    except BaseException:
        if remove and not (out / "checkpoints" / "last.safetensors").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _flushed_print(*args) -> None:
    """print, flushed at once: in a log file, the epoch lines stay in order with the progress lines on stderr."""
    print(*args, flush=True)


def _checkpoint_epoch(path: Path) -> int:
    from climber.train.checkpoint import read_meta

    return read_meta(path)["epoch"]


def _eval(args) -> None:
    from climber.eval.evaluate import evaluate_run

    out = evaluate_run(Path(args.run), Path(args.data) if args.data else None, split=args.split,
                       device=args.device or "auto")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        m = out["metrics"]
        print(f"{args.split}: AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  LogLoss {m['logloss']:.4f}  "
              f"({m['candidates']:,} candidates)")
        print(f"{args.split}: HR@10 over own candidates {m['hr@10']:.4f}  NDCG@10 over own candidates "
              f"{m['ndcg@10']:.4f}  (each user ranks only their own {args.split} events: "
              f"{m['candidates_per_user_mean']:.1f} candidates per user on average, median "
              f"{m['candidates_per_user_median']:g}, {m['ranked_users']:,} users with a positive)")
        if "bayes" in out:
            from climber.data.synthetic import ceiling_text

            print(f"{args.split} {ceiling_text(out['bayes'])}; gap in AUC {out['bayes']['auc'] - m['auc']:.4f}")


def _floor(args) -> None:
    from climber.eval.floor import item_rate_floor

    out = item_rate_floor(Path(args.data), args.split)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    m = out["metrics"]
    print(f"{args.split} floor (item train positive rate, no training): AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  "
          f"LogLoss {m['logloss']:.4f}  ({out['candidates']:,} candidates, "
          f"{out['unseen_item_fraction']:.1%} of them items unseen in train)")
    if out["repeat_fraction"]:
        print(f"{out['repeat_fraction']:.1%} of the candidates are items their user has in train (positive rate "
              f"{out['repeat_positive_rate']:.3f}, the others' {out['other_positive_rate']:.3f})")


def _robustness(args) -> None:
    from climber.robustness import MEMBERS, diagnose, gaps, run_suite

    members = _names(args.members or ",".join(MEMBERS))
    models = _names(args.models)
    if args.gaps:
        gaps(Path(args.out), models, args.seeds, members)
        print(f"wrote {Path(args.out) / 'gaps.md'}")
        return
    if args.diagnose:
        diagnose(Path(args.out), models, args.seeds, members)
        print(f"wrote {Path(args.out) / 'diagnostics.md'}")
        return
    run_suite(Path(args.out), models, args.seeds, members, Path(args.ml100k), Path(args.taobao), _overrides(args),
              _command_line("robustness"))
    print(f"wrote {Path(args.out) / 'robustness.md'}")


def _command_line(subcommand: str) -> str:
    """The command as typed, for the result files (a placeholder when not run as ``climber``)."""
    return "climber " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("climber") else f"climber {subcommand} ..."


def _compare(args) -> None:
    from climber.compare import Entry, compare

    entries = [Entry.parse(t) for t in args.models.split(",") if t.strip()]
    command = _command_line("compare")
    compare(Path(args.data), entries, args.seeds, Path(args.out), _overrides(args), command)


def _flops(args) -> None:
    from climber.scaling.flops import flops_report

    r = flops_report(args.model, args.set or [], candidates=args.candidates, length=args.length)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    f = r["forward_flops"]
    print(f"{args.model} {' '.join(r['overrides'])}: subsequence lengths {r['lengths']}, {r['candidates']} candidates per row")
    print(f"  forward FLOPs per row: analytic {f['analytic']:,}  measured {f['measured']:,} "
          f"({f['relative_difference']:+.2%}); training (3x) {r['train_flops_analytic']:,}; "
          f"per candidate {r['per_candidate_forward_flops']:,.0f}")
    print("  measured split: " + ", ".join(f"{k} {v / f['measured']:.1%}" for k, v in r["measured_split"].items()))
    p = r["parameters"]
    print(f"  parameters: {p['total']:,} ({p['embeddings']:,} in embedding tables, {p['dense']:,} dense)")


def _scale_sweep(args) -> None:
    from climber.scaling.sweep import load_grid_preset, parse_grids, sweep

    preset = load_grid_preset(args.preset) if args.preset else {}
    models_text = args.models or ",".join(preset.get("models", ["climber"]))
    grid_text = args.grid or preset.get("grid")
    if not grid_text:
        raise ConfigError("scale sweep: give --grid (e.g. \"s=64,128;l=1,2;d=64\") or --preset (cpu, gpu or a YAML file)")
    models = _names(models_text)
    command = _command_line("scale sweep")
    sweep(Path(args.data), models, parse_grids(grid_text), Path(args.out), [*preset.get("set", []), *(args.set or [])],
          command, seeds=args.seeds or preset.get("seeds", 1), blocks=args.blocks or preset.get("blocks", "each"))


def _scale_fit(args) -> None:
    from climber.scaling.fit import fit_sweep

    out = fit_sweep(Path(args.sweep), args.metric)
    print(f"{out['metric']} = {out['law']}")
    for model, f in out["fits"].items():
        noise = f"  seed std {f['seed_std']:.4f}" if f["seed_std"] is not None else ""
        print(f"  {model:14s} E {f['E']:.4f}  A {f['A']:.4g}  alpha {f['alpha']:.3f}  R2 {f['r2']:.3f}  ({f['points']} "
              f"points, {f['seeds']} seed(s) each at most; residual rms {f['residual_rms']:.4f}{noise})")
        for axis, e in f["axes"].items():
            print(f"    raising {axis}: {e['steps']} steps at {e['flops_ratio']:.2f}x FLOPs, mean change "
                  f"{e['mean_change']:+.4f}, worse in {e['worse']}")
    print(f"wrote {Path(args.sweep) / 'fit.json'} (with 90% bootstrap bands)")


def _scale_plot(args) -> None:
    from climber.scaling.plot import plot_sweep

    for path in plot_sweep(Path(args.sweep)):
        print(f"wrote {path}")


def _scale_advise(args) -> None:
    from climber.scaling.advise import advise, markdown

    out = advise(Path(args.sweep), args.flops, args.model, args.tolerance)
    print(json.dumps(out, indent=2) if args.json else markdown(out))


def _tune(args) -> None:
    from climber.compare import Entry
    from climber.tune import tune

    entries = [Entry.parse(t) for t in args.models.split(",") if t.strip()]
    command = _command_line("tune")
    tune(Path(args.data), entries, args.trials, Path(args.out), Path(args.configs), _overrides(args), command,
         seed=args.seed)


def _quickstart(args) -> None:
    from climber.quickstart import quickstart

    quickstart(Path(args.out), dataset=args.dataset, source=Path(args.source) if args.source else None)


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"expected positive integers, got {text!r}")
    return values


def _bench(args) -> None:
    import torch

    from climber import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *_: None) if args.json else print
    lengths_given = args.lengths is not None
    grid = dict(lengths=_csv_ints(args.lengths or args.default_lengths), candidates=_csv_ints(args.candidates), overrides=args.set or [], log=log,
                device=args.device or "auto")
    if args.bench_command == "attention":
        from climber import bench_attention
        from climber.models.attention import check_attention

        paths = [check_attention("--paths: model", p.strip()) for p in args.paths.split(",") if p.strip()]
        if len(grid["candidates"]) != 1:
            raise ConfigError(f"bench attention: one --candidates value, got {args.candidates!r}")
        out = bench_attention.bench_attention(args.model, args.mode, grid["lengths"], grid["candidates"][0], args.rows,
                                              paths, args.steps, args.threads, grid["overrides"], log=log,
                                              device=grid["device"])
        print(json.dumps(out, indent=2) if args.json else "\n" + bench_attention.markdown(out))
        return
    if args.bench_command == "train":
        if args.config:
            if lengths_given:
                raise ConfigError("bench train: --config times the model as configured; leave out --lengths")
            grid["lengths"] = (None,)
        out = bench.bench_train(None if args.config else args.model, rows=args.rows, steps=args.steps,
                                compile=args.compile, single=not args.no_single,
                                config=Path(args.config) if args.config else None, **grid)
    else:
        out = bench.bench_serve(args.model, requests=args.requests, **grid)
    print(json.dumps(out, indent=2) if args.json else "\n" + bench.markdown(out))


def _require_serving() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx", "prometheus_client", "orjson")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the HTTP service needs {', '.join(missing)}: pip install 'climber[serve]'")


def _bench_http(args) -> None:
    _require_serving()
    from climber.serve.loadtest import bench_http, markdown

    log = (lambda *_: None) if args.json else print
    out = bench_http(Path(args.run), requests=args.requests, concurrency=_csv_ints(args.concurrency),
                     candidates=args.candidates, batch_window_ms=args.batch_window_ms, mix=args.mix,
                     max_queue=args.max_queue, timeout_ms=args.timeout_ms, max_batch=args.max_batch, log=log)
    print(json.dumps(out, indent=2) if args.json else "\n" + markdown(out))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEVICE_HELP = "auto (CUDA when available, else CPU; the default), cpu, cuda, cuda:N or mps"


def _serve(args) -> None:
    _require_serving()
    from climber.serve.app import Service, create_app, serve

    key = os.environ.get(args.api_key_env) or None
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the model thread's too (torch's setting is process-wide)
    if args.host not in LOOPBACK and key is None and not args.no_auth:
        raise ConfigError(f"--host {args.host} exposes the service beyond this machine: set an API key in "
                         f"${args.api_key_env} (clients send it as X-API-Key) or pass --no-auth")
    service = Service(Path(args.run), args.data and Path(args.data), args.store and Path(args.store),
                      cache_bytes=int(args.cache_mb * 2**20), device=args.device or "auto")
    app = create_app(service, api_key=key, max_candidates=args.max_candidates, max_events=args.max_events,
                     batch_window_ms=None if args.no_batching else args.batch_window_ms, max_batch=args.max_batch,
                     max_body_bytes=args.max_body_kb * 1024, max_queue=args.max_queue,
                     timeout_ms=args.timeout_ms or None)
    print(f"serving {args.run} ({service.model_name}, KV cache: {service.engine.caches_kv}) on "
          f"http://{args.host}:{args.port}; OpenAPI at /openapi.json (/docs: Swagger UI, from a CDN); "
          f"store {service.store.path}"
          f"{'; X-API-Key required' if key else ''}", flush=True)
    serve(app, args.host, args.port, args.log_level)
    print("stopped: every request in flight answered, the store closed", flush=True)


REFERENCE_CANDIDATES = 32  # candidates per row of `climber flops` and `climber models --json`


def _models(args) -> None:
    from climber.config import preset_names, preset_of
    from climber.models import model_names

    if not args.json:
        print("models: " + ", ".join(model_names()))
        print("presets: " + ", ".join(preset_names()))
        return
    from climber.bench import INFO
    from climber.config import resolve
    from climber.models import build_model, flops_per_candidate, parameter_counts

    presets = []
    for name in preset_names():
        cfg = resolve(name, None, [])
        model = build_model(cfg.model, cfg.model_config, INFO)
        presets.append({"name": name, "model": cfg.model, "parameters": parameter_counts(model),
                        "forward_flops_per_candidate": flops_per_candidate(model, REFERENCE_CANDIDATES)})
    print(json.dumps({
        "version": __version__,
        "assumes": {"users": INFO.num_users, "items": INFO.num_items, "actions": INFO.num_actions,
                    "scenarios": INFO.num_scenarios, "candidates_per_row": REFERENCE_CANDIDATES,
                    "note": "the vocabulary sizes of `climber flops` (climber.bench.INFO): embedding parameters grow "
                            "with a data set's; FLOPs are the analytic forward FLOPs of one row, every subsequence "
                            "at its full length, divided by its candidates"},
        "models": [{"name": name, "default_preset": preset_of(name)} for name in model_names()],
        "presets": presets,
    }, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="climber", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"climber {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare, synthesise and inspect event data").add_subparsers(dest="data_command", required=True)
    pr = data.add_parser("prepare", help="raw log -> prepared dir (ids, labels, protocol split)")
    pr.add_argument("source_name", metavar="SOURCE", help="a named data set (e.g. movielens-100k) or a CSV/Parquet path")
    pr.add_argument("--out", required=True, help="prepared dir to write")
    pr.add_argument("--source", help="local copy of a named data set: its folder or its file, e.g. .../u.data "
                                     "(default: download to a cache)")
    pr.add_argument("--columns", metavar="ROLE=COLUMN,...",
                    help="which file column plays which role, e.g. user=userId,item=movieId,ts=timestamp,"
                         "action=rating. Roles: user, item, ts, action (required); scenario (default: one scenario); "
                         "label (0/1, for --label label); features: item_NAME (categorical, one value per item), "
                         "user_NAME (categorical, one value per user), ctx_NAME (categorical, per event: device, "
                         "page), num_NAME (a number per event: price); any other name is kept as an event column "
                         "no model reads. File columns already named after a role need no mapping (docs/data.md)")
    pr.add_argument("--label", help="label rule for a file: 'action>=4' or 'action in cart,fav,buy' or 'label'")
    pr.add_argument("--actions", help="allowed action values (comma separated); others are an error")
    pr.add_argument("--separator", default=",",
                    help="field separator of a CSV: one character or tab, comma, semicolon, pipe, space (default ',')")
    pr.add_argument("--ts-unit", choices=list(TS_UNITS),
                    help="unit of numeric time stamps, converted to seconds (default s; ISO 8601 text is read as such)")
    pr.add_argument("--names", help="column names of a headerless CSV, comma separated")
    pr.add_argument("--user-table", metavar="FILE",
                    help="user features: a CSV/Parquet file of one row per user, joined on the user id; each "
                         "column but the key becomes a categorical user_<column> feature")
    pr.add_argument("--user-key", default="user", help="the user id column of --user-table (default: user)")
    pr.add_argument("--user-separator", help="field separator of --user-table (default: --separator)")
    pr.add_argument("--multi", metavar="COLUMN,...",
                    help="item_* / user_* columns whose values are bags (e.g. a film's genres 'Drama|War')")
    pr.add_argument("--multi-separator", default="|", help="between the values of a --multi column (default '|')")
    pr.add_argument("--single", metavar="COLUMN,...",
                    help="keep these columns one value (the whole set) where the data set makes them bags, "
                         "e.g. --single item_genres for MovieLens-100k")
    pr.add_argument("--drop", metavar="PATTERN,...",
                    help="feature columns to leave out, by name or pattern, e.g. --drop 'user_*'")
    pr.add_argument("--derive", metavar="hour,weekday",
                    help="per-event time context from ts: ctx_hour (0..23) and / or ctx_weekday (mon..sun)")
    pr.add_argument("--tz", default="UTC", help="IANA time zone of --derive (default UTC), e.g. Asia/Shanghai")
    pr.add_argument("--fill", choices=["zero", "mean"],
                    help="missing num_* values: 0, or the train split's mean (default: refused, naming the row)")
    pr.add_argument("--force", action="store_true", help="replace --out if it exists")
    pr.set_defaults(func=_data_prepare)

    sy = data.add_parser("synth", help="synthetic log with known true click probabilities")
    sy.add_argument("--out", required=True)
    sy.add_argument("--kind", choices=["topics", "lifelong"], default="topics",
                    help="topics: generator v3 (default); lifelong: generator v4, docs/benchmarks/lifelong.md")
    sy.add_argument("--users", type=int, default=None, help="default 2000")
    sy.add_argument("--events-per-user", type=int, default=100, help="topics: mean events per user")
    sy.add_argument("--items", type=int, default=None, help="default 1000 (topics), 20000 (lifelong: tracks)")
    sy.add_argument("--topics", type=int, default=20, help="topics only")
    sy.add_argument("--median-events", type=int, default=1000, help="lifelong: median history length")
    sy.add_argument("--artists", type=int, default=2000, help="lifelong: artists, each in one genre")
    sy.add_argument("--genres", type=int, default=24, help="lifelong: genres")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--force", action="store_true")
    sy.set_defaults(func=_data_synth)

    sh = data.add_parser("shard", help="split a prepared dir's events into Parquet shards by user (distributed training)")
    sh.add_argument("--data", required=True, help="prepared dir")
    sh.add_argument("--shards", type=int, required=True, help="number of shards: the processes or a multiple")
    sh.add_argument("--out", help="shard dir to write (default: DATA/shards-K)")
    sh.add_argument("--force", action="store_true", help="replace --out if it exists")
    sh.set_defaults(func=_data_shard)

    info = data.add_parser("info", help="print a prepared dir's manifest")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_data_info)

    tr = sub.add_parser("train", help="train a model on a prepared dir")
    tr.add_argument("--data", required=True, help="prepared dir")
    tr.add_argument("--model", help="model or preset name (default: the config file's, else climber)")
    tr.add_argument("--config", help="YAML config file (model, model_config, train)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4 (repeatable)")
    tr.add_argument("--out", required=True, help="run dir")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--json", action="store_true", help="print final metrics as JSON")
    tr.add_argument("--nproc", type=int, default=1,
                    help="processes on this machine (DDP/FSDP; docs/distributed.md): torchrun --standalone for you")
    tr.add_argument("--shards", help="`climber data shard` dir for several processes (default: cut into the run dir)")
    tr.add_argument("--device", help=DEVICE_HELP)
    tr.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a run's best checkpoint")
    ev.add_argument("--run", required=True)
    ev.add_argument("--data", help="prepared dir (default: the one the run was trained on)")
    ev.add_argument("--split", default="test", choices=["val", "test"])
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--device", help=DEVICE_HELP)
    ev.set_defaults(func=_eval)

    ro = sub.add_parser("robustness", help="the robustness suite (docs/results/robustness.md): floor and compare "
                                           "on five data sets, one table")
    ro.add_argument("--out", required=True, help="folder for the prepared members, the runs and robustness.{md,json}")
    ro.add_argument("--models", default="climber,dlrm", help="comma separated entries, as for compare")
    ro.add_argument("--seeds", type=int, default=3)
    ro.add_argument("--members", help="comma separated subset of the members (default: all five)")
    ro.add_argument("--ml100k", default="../shared/data/ml-100k", help="folder with MovieLens-100k's u.data (and items.csv)")
    ro.add_argument("--taobao", default="../shared/data/taobao-userbehavior-sample",
                    help="folder with the Taobao UserBehavior slice")
    ro.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run (repeatable)")
    ro.add_argument("--device", help=DEVICE_HELP)
    ro.add_argument("--diagnose", action="store_true",
                    help="train nothing: from the finished runs, where test GAUC is lost (floor logit added, the "
                         "seeds' logits averaged, val LogLoss selection replayed, GAUC by pair class of the items' "
                         "train events, against the floor's); writes OUT/diagnostics.md")
    ro.add_argument("--gaps", action="store_true",
                    help="train nothing: the first of two --models entries against the floor (test GAUC) and the "
                         "second (test GAUC, AUC), each gap with a 90%% band from resampling the test users; "
                         "writes OUT/gaps.md")
    ro.set_defaults(func=_robustness)

    fo = sub.add_parser("floor", help="the no-training floor: candidates scored by their item's train positive rate")
    fo.add_argument("--data", required=True, help="prepared dir")
    fo.add_argument("--split", default="test", choices=["val", "test"])
    fo.add_argument("--json", action="store_true")
    fo.set_defaults(func=_floor)

    co = sub.add_parser("compare", help="train several models over seeds; table of mean ± std test figures")
    co.add_argument("--data", required=True, help="prepared dir")
    co.add_argument("--models", required=True,
                    help="comma separated: NAME or LABEL=NAME:key=value:... (e.g. noatl=climber:model.use_atl=false)")
    co.add_argument("--seeds", type=int, default=3)
    co.add_argument("--out", required=True, help="folder for the run dirs and results.{md,csv,json}")
    co.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every model (repeatable)")
    co.add_argument("--device", help=DEVICE_HELP)
    co.set_defaults(func=_compare)

    fl = sub.add_parser("flops", help="analytic and measured FLOPs per row, split by module kind, parameters")
    fl.add_argument("--model", default="climber", help="model or preset name (default: climber)")
    fl.add_argument("--candidates", type=int, default=REFERENCE_CANDIDATES,
                    help=f"candidates per row (default {REFERENCE_CANDIDATES})")
    fl.add_argument("--length", type=int, help="set every subsequence length (default: the preset's)")
    fl.add_argument("--set", action="append", metavar="KEY=VALUE", help="model override (repeatable)")
    fl.add_argument("--json", action="store_true", help="print the report as JSON")
    fl.set_defaults(func=_flops)

    scale = sub.add_parser("scale", help="scaling studies").add_subparsers(dest="scale_command", required=True)
    sw = scale.add_parser("sweep", help="train a grid of length s x depth l x width d per model; one table")
    sw.add_argument("--data", required=True, help="prepared dir")
    sw.add_argument("--preset", help="a grid preset: cpu (the default CPU grid), gpu, or a YAML file with models, "
                                     "grid, set, seeds and blocks; --grid, --models, --seeds, --blocks and --set "
                                     "given here take precedence / add")
    sw.add_argument("--grid", help='e.g. "s=64,128,256;l=1,2,4;d=64" (a missing axis keeps the model preset\'s); '
                                   'several grids separated by "|" sweep their union')
    sw.add_argument("--blocks", choices=("each", "total"),
                    help="what s sets in Climber's blocks: each one's length (the default), or the sum of their "
                         "lengths, each block keeping its share")
    sw.add_argument("--models", help="comma separated model or preset names or YAML configs, as for compare "
                                     "(default: climber)")
    sw.add_argument("--seeds", type=int, help="seeds per point (default: the preset's, else 1)")
    sw.add_argument("--out", required=True, help="folder for the run dirs and sweep.{md,json}")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every point (repeatable)")
    sw.set_defaults(func=_scale_sweep)
    sf = scale.add_parser("fit", help="saturating power law of LogLoss (or 1 - AUC) against training FLOPs per model")
    sf.add_argument("--sweep", required=True, help="a `climber scale sweep` output folder (holds sweep.json)")
    sf.add_argument("--metric", default="logloss", help="logloss (default) or auc (fits 1 - AUC)")
    sf.set_defaults(func=_scale_fit)
    sa = scale.add_parser("advise", help="(s, l, d) for a FLOPs budget from the sweep's fitted surface; equal-FLOPs table")
    sa.add_argument("--sweep", required=True, help="a `climber scale sweep` output folder")
    sa.add_argument("--flops", type=float, required=True, help="budget: forward FLOPs per candidate, e.g. 2e6")
    sa.add_argument("--model", help="model family of the sweep (default: its first)")
    sa.add_argument("--tolerance", type=float, default=0.15, help="equal FLOPs means within this fraction (0.15)")
    sa.add_argument("--json", action="store_true", help="print the result as JSON")
    sa.set_defaults(func=_scale_advise)
    sp = scale.add_parser("plot", help="PNG of AUC / LogLoss against FLOPs per model, and s x l heat maps")
    sp.add_argument("--sweep", required=True, help="a `climber scale sweep` output folder")
    sp.set_defaults(func=_scale_plot)

    tu = sub.add_parser("tune", help="the same budget of trials per model (lr, dropout, weight decay), chosen on val AUC")
    tu.add_argument("--data", required=True, help="prepared dir")
    tu.add_argument("--models", required=True, help="comma separated entries, as for compare")
    tu.add_argument("--trials", type=int, default=4, help="trials per model; trial 0 is the preset as it is")
    tu.add_argument("--seed", type=int, default=0, help="seed of the trial draws (the same draws for every model)")
    tu.add_argument("--out", required=True, help="folder for the trial run dirs and tuning.{md,json}")
    tu.add_argument("--configs", default="configs/tuned", help="where the winners' configs go (<label>.yaml)")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every trial (repeatable)")
    tu.add_argument("--device", help=DEVICE_HELP)
    tu.set_defaults(func=_tune)

    qs = sub.add_parser("quickstart", help="synthesise (or prepare) data, train a small Climber, evaluate, report")
    qs.add_argument("--out", default="runs/quickstart")
    qs.add_argument("--dataset", help="a named data set instead of synthetic data, e.g. movielens-100k")
    qs.add_argument("--source", help="local copy of the named data set: its folder or its file")
    qs.set_defaults(func=_quickstart)

    bench = sub.add_parser("bench", help="benchmarks: training throughput, scoring latency, HTTP load").add_subparsers(
        dest="bench_command", required=True)
    bt = bench.add_parser("train", help='forward + backward samples/s: "single user, multiple items" vs single item')
    bs = bench.add_parser("serve", help="scoring latency p50/p99: KV-cached history vs full recompute")
    ba = bench.add_parser("attention", help="long histories: attention paths side by side (time, MFU, peak memory), "
                                            "each point in a fresh process")
    for b, lengths, cands in ((bt, "64,256,512", "8,64"), (bs, "256,1024,4096", "16,128,512"), (ba, "512,2048", "64")):
        b.add_argument("--model", default="climber", help="model or preset name (default: climber)")
        b.add_argument("--lengths", help=f"history lengths, comma separated (default {lengths})")
        b.set_defaults(default_lengths=lengths)
        b.add_argument("--candidates", default=cands, help=f"candidates per user, comma separated (default {cands})")
        b.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        b.add_argument("--set", action="append", metavar="KEY=VALUE", help="model override, e.g. model.attention=reference")
        b.add_argument("--json", action="store_true", help="print the results as JSON")
        b.add_argument("--device", help=DEVICE_HELP)
        b.set_defaults(func=_bench)
    bt.add_argument("--rows", type=int, default=2, help="users per step")
    bt.add_argument("--steps", type=int, default=3, help="timed steps per point (the median is reported)")
    bt.add_argument("--compile", action="store_true", help="torch.compile the model first")
    bt.add_argument("--config", help="a run config file (train --config), timed as configured: its own history lengths")
    bt.add_argument("--no-single", action="store_true",
                    help="time the multi form only (the single form repeats the history once per candidate)")
    bs.add_argument("--requests", type=int, default=20, help="timed requests per point")
    ba.add_argument("--mode", default="train", choices=["train", "forward"], help="training steps or forwards")
    ba.add_argument("--rows", type=int, default=8, help="users per step")
    ba.add_argument("--steps", type=int, default=3, help="timed steps per point (the median is reported)")
    ba.add_argument("--paths", default="structured,dense",
                    help="model.attention values, comma separated; ratios are against the last (default structured,dense)")
    bh = bench.add_parser("http", help="load on the real HTTP service over loopback, with and without dynamic batching")
    bh.add_argument("--run", required=True, help="a `climber train` run dir")
    bh.add_argument("--requests", type=int, default=2000, help="score requests per concurrency level")
    bh.add_argument("--concurrency", default="1,4,16,32,64", help="concurrent clients, comma separated")
    bh.add_argument("--mix", help="share of each route, e.g. score=0.8,events=0.2 (default: scores only); each "
                                  "event goes to a new user, and every acknowledged one is checked stored")
    bh.add_argument("--max-queue", type=int, default=256, help="the servers' --max-queue")
    bh.add_argument("--timeout-ms", type=float, default=2000, help="the servers' --timeout-ms")
    bh.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    bh.add_argument("--candidates", type=int, default=64, help="candidates per request")
    bh.add_argument("--batch-window-ms", type=float, default=2.0, help="the batched server's window")
    bh.add_argument("--json", action="store_true", help="print the results as JSON")
    bh.set_defaults(func=_bench_http)

    se = sub.add_parser("serve", help="HTTP scoring service of a run: FastAPI, KV cache, SQLite history store")
    se.add_argument("--run", required=True, help="a `climber train` run dir (its best checkpoint is served)")
    se.add_argument("--data", help="prepared dir with the vocabularies (default: the run's data)")
    se.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, this machine only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--store", help="SQLite history store, seeded from the data's events on first start (default "
                                    "$XDG_STATE_HOME or ~/.local/state, then climber/serve/RUNNAME-HASH/"
                                    "history.sqlite: one per run and data, outside the run dir)")
    se.add_argument("--api-key-env", default="CLIMBER_API_KEY",
                    help="environment variable holding the API key; when set, requests need X-API-Key")
    se.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    se.add_argument("--max-candidates", type=int, default=1000, help="candidates per score request at most")
    se.add_argument("--max-events", type=int, default=1000, help="events per events request at most")
    se.add_argument("--max-body-kb", type=int, default=1024, help="request body size limit")
    se.add_argument("--cache-mb", type=float, default=256, help="LRU cache of users' K/V, in MiB")
    se.add_argument("--batch-window-ms", type=float, default=2.0,
                    help="dynamic batching: score requests arriving within this window share one forward")
    se.add_argument("--max-batch", type=int, default=32, help="requests per batched forward at most")
    se.add_argument("--no-batching", action="store_true", help="one forward per score request")
    se.add_argument("--max-queue", type=int, default=256,
                    help="requests admitted at once (score and events); past it: 503 with Retry-After at once")
    se.add_argument("--timeout-ms", type=float, default=2000,
                    help="a request not answered within this gets 504 and its work is dropped (0: no deadline)")
    se.add_argument("--threads", type=int, default=0,
                    help="torch threads of the model (0: torch's default). 1 lowers the latency at low load where "
                         "clients share the cores (docs/benchmarks.md, operations), at some cost in throughput")
    se.add_argument("--log-level", default="warning", help="uvicorn log level")
    se.add_argument("--device", help=DEVICE_HELP)
    se.set_defaults(func=_serve)

    mo = sub.add_parser("models", help="list registered models and presets")
    mo.add_argument("--json", action="store_true", help="as JSON, with each preset's parameters and forward FLOPs "
                                                        "per candidate (on a reference data size, stated)")
    mo.set_defaults(func=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from climber.devices import flushed_denormals

        with flushed_denormals():
            args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except BrokenPipeError:  # e.g. `climber data info DIR --json | head -1`: stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit writes nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe
    except USER_ERRORS as e:
        if os.environ.get("CLIMBER_DEBUG"):
            raise
        print(f"climber: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("climber: interrupted", file=sys.stderr)
        return 130
    return 0
