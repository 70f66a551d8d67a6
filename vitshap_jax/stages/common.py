"""What the three stages share: optimizer, train state, evaluation over a split, upstream loading."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

from vitshap_jax import checkpoints as ckpt_lib
from vitshap_jax import data, parallel
from vitshap_jax.config import MASKINGS, VIT_VARIANTS, default_masking
from vitshap_jax.errors import StageError, UserError
from vitshap_jax.files import absolute, write_json
from vitshap_jax.models import ARCHITECTURE_OPTIONS, abstract_params

# The model's architecture: what a pretrained checkpoint fixes, and what a stage that inherits its
# upstream run's architecture copies (`resolve`).
ARCHITECTURE_FIELDS = (
    "model.architecture",
    "model.patch_size",
    "model.hidden_size",
    "model.depth",
    "model.num_heads",
    "model.mlp_dim",
    *(f"model.{k}" for k in ARCHITECTURE_OPTIONS),
    "model.stem",
    "model.norm",
    "model.mask_channel",
)
# Fields that must agree between a stage and the upstream run it builds on: the data and the players (a
# patch is the same player for the classifier, the surrogate and the explainer). The architectures may
# differ (a ResNet surrogate of a ViT classifier).
UPSTREAM_FIELDS = (
    "dataset.name",
    "dataset.num_classes",
    "dataset.target",
    "dataset.image_size",
    "dataset.normalization",
    "model.patch_size",
)
# Values of fields that configs written before the field existed lack.
_DEFAULTS = {f"model.{k}": v for k, v in ARCHITECTURE_OPTIONS.items()} | {
    "model.from_checkpoint": "",
    "model.architecture": "vit",
    "model.variant": "",
    "model.stem": "auto",
    "model.norm": "group",
    "model.mask_channel": False,
    "model.mask_value": -3.0,
    "dataset.normalization": "inception",
    "explainer.architecture": "vit",
    "explainer.target_views": 1,
    "explainer.view_mix": 0.0,
    "explainer.teachers": "",
    "explainer.extra_images": "",
    "dataset.train_examples": 0,
    "optim.ema_decay": 0.0,
}
# Fields a stage chooses itself, even when it takes its upstream run's architecture (`resolve`).
OWN_FIELDS = ("model.mask_channel",)


def _field(tree, key):
    for part in key.split("."):
        if part not in tree and key in _DEFAULTS:
            return _DEFAULTS[key]
        tree = tree[part]
    return tree


def _set(config, key: str, value) -> None:
    group, name = key.split(".")
    current = config[group][name]
    config[group][name] = type(current)(value) if isinstance(current, (int, float)) else value


def inherits(config, upstream: dict | None) -> bool:
    """Whether a surrogate or explainer stage takes its upstream run's architecture (`resolve`): its
    `config.model.variant` is empty or the upstream's, and (a ViT explainer) the upstream is a ViT."""
    if upstream is None:
        return False
    variant = config.model.get("variant", "")
    if variant and variant != _field(upstream, "model.variant"):
        return False
    vit_backbone = config.stage == "explainer" and config.explainer.get("architecture", "vit") == "vit"
    return not (vit_backbone and _field(upstream, "model.architecture") != "vit")


def _inherited(present: dict, upstream: dict) -> dict:
    """{key: the upstream's value} of the fields an inheriting stage (`inherits`) takes from its upstream
    run where its config (`present`, flat) says otherwise: the architecture but `OWN_FIELDS`."""
    keys = (*ARCHITECTURE_FIELDS, "model.from_checkpoint", "model.variant")
    return {
        key: _field(upstream, key)
        for key in keys
        if key in present and key not in OWN_FIELDS and present[key] != _field(upstream, key)
    }


def same_architecture(a: dict, b: dict) -> bool:
    """Whether two stage configs (as dicts) describe the same model shape (`ARCHITECTURE_FIELDS`; a mask
    channel aside), so that one's parameters start the other."""
    return all(_field(a, k) == _field(b, k) for k in ARCHITECTURE_FIELDS if k != "model.mask_channel")


def resolve(config, upstream: dict | None = None) -> None:
    """Fills in place what a run reads from elsewhere than its config file, before anything is built:

    * `config.dataset.class_names` from the data (`data.dataset_classes`; prepares it if needed), and for
      the folder dataset its class count and, with target "auto", the target (binary for two classes);
    * with `config.model.pretrained`, the architecture (`ARCHITECTURE_FIELDS`) the checkpoint needs
      (`models.read_architecture`; a value set in the config that differs is logged and replaced) and,
      with `dataset.normalization="auto"`, the normalization it states;
    * otherwise, for a stage that `inherits` its upstream run's architecture (`upstream`, that run's
      config as a dict), that architecture and its variant name;
    * `dataset.normalization`: "auto" becomes the checkpoint's, else the upstream's, else "inception"; a
      stage must use its upstream's (the surrogate's teacher sees the same images), checked here;
    * `config.model.masking="auto"`: the architecture's first strategy (attention for a ViT).
    """
    from vitshap_jax.models import checkpoint_architecture, masking_of

    m, d = config.model, config.dataset
    if "class_names" in d:
        names = data.dataset_classes(config)
        d.class_names = names
        if d.name == "folder":
            d.num_classes = len(names)
            if d.target == "auto":
                d.target = "binary" if len(names) == 2 else "multiclass"
            logging.info("folder: %d classes (%s), %s target", len(names), ", ".join(names[:10]), d.target)
    stated = None  # the normalization a checkpoint states
    if m.get("pretrained"):
        m.pretrained = os.path.expanduser(m.pretrained)
        arch = checkpoint_architecture(m.pretrained)
        overrides = checkpoint_overrides(m.get("checkpoint_overrides", ""))
        for name, value in (arch["model"] | overrides).items():
            if m[name] != value:
                how = "given in config.model.checkpoint_overrides" if name in overrides else "read from"
                logging.info("config.model.%s=%r -> %r (%s %s)", name, m[name], value, how, m.pretrained)
            _set(config, f"model.{name}", value)
        m.from_checkpoint = os.path.abspath(m.pretrained)
        m.variant = ""  # the shape is the checkpoint's, whatever variant the config started from
        stated = arch["normalization"] or ("inception" if upstream is None else None)
    elif inherits(config, upstream):
        present = _flat(config.to_dict())
        for key, theirs in _inherited(present, upstream).items():
            logging.info("config.%s=%r -> %r (the upstream run's)", key, present[key], theirs)
            _set(config, key, theirs)
    if upstream is not None:
        theirs = _field(upstream, "dataset.normalization")
        if d.normalization == "auto" and stated not in (None, theirs):
            raise StageError(
                f"{m.pretrained} states {stated!r} normalization, but the upstream run used {theirs!r}: both "
                f"models see the same images; set config.dataset.normalization={theirs} to use it anyway"
            )
        if d.normalization not in ("auto", theirs):
            raise StageError(
                f"config.dataset.normalization={d.normalization!r}, but the upstream run used {theirs!r}: "
                "leave it at auto (a stage sees the images its upstream saw)"
            )
        d.normalization = theirs
    elif d.normalization == "auto":
        d.normalization = stated or "inception"
        if stated and m.get("pretrained"):
            logging.info("config.dataset.normalization=%s (from %s)", d.normalization, m.pretrained)
    if m.get("masking") == "auto":
        m.masking = masking_of(config)
    kind = m.get("architecture", "vit")
    if "masking" in m and m.masking not in MASKINGS[kind]:
        # The defaults a config starts with follow the architecture; a surrogate's masking is a choice.
        if config.stage == "surrogate" or m.masking not in [default_masking(a) for a in MASKINGS]:
            source = m.get("pretrained") or "the upstream run"
            raise StageError(
                f"config.model.masking={m.masking!r}: the model is a {kind} (from {source}), which masks "
                f"by {' or '.join(MASKINGS[kind])}"
            )
        logging.info(
            "config.model.masking=%s -> %s (the model is a %s)", m.masking, default_masking(kind), kind
        )
        m.masking = default_masking(kind)


def checkpoint_overrides(text: str) -> dict:
    """`config.model.checkpoint_overrides` ("num_heads=16,act=gelu_tanh") as {field: value}: what a
    checkpoint cannot tell (a timm file without its config.json), stated by hand; typed like the field."""
    chosen = ("model.architecture", "model.variant", "model.mask_value", "model.mask_channel")
    defaults = {
        k.split(".")[1]: v for k, v in _DEFAULTS.items() if k.startswith("model.") and k not in chosen
    }
    defaults |= {k: 0 for k in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim")}
    result = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or key not in defaults or key == "from_checkpoint":
            known = ", ".join(k for k in defaults if k != "from_checkpoint")
            raise StageError(
                f"config.model.checkpoint_overrides: {item!r} is not field=value with a field of {known}"
            )
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise StageError(
                    f"config.model.checkpoint_overrides: {key} needs true or false, not {value!r}"
                )
            result[key] = value.lower() == "true"
        else:
            try:
                result[key] = kind(value)
            except ValueError:
                raise StageError(
                    f"config.model.checkpoint_overrides: {key}={value!r} is not a {kind.__name__}"
                ) from None
    return result


def upstream_dir(config, workdir: str, upstream_stage: str) -> str:
    """Where a stage's upstream run is: `config.upstream`, or `{workdir}/{upstream_stage}`."""
    return absolute(config.upstream) if config.upstream else os.path.join(absolute(workdir), upstream_stage)


def upstream_config(config, workdir: str, upstream_stage: str) -> dict | None:
    """The config of the upstream run (`upstream_dir`), if there is one."""
    path = upstream_dir(config, workdir, upstream_stage)
    if not os.path.exists(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        return None
    return ckpt_lib.read_config(path)


# The stage each single stage builds on.
UPSTREAM_STAGE = {"surrogate": "classifier", "explainer": "surrogate"}


def refuse_dropped_flags(config, flagged, workdir: str) -> None:
    """Refuses command-line values (`flagged`: the dotted keys set, e.g. "model.hidden_size") of
    architecture fields that `resolve` would replace by the upstream run's: a surrogate or explainer whose
    `config.model.variant` is empty (or the upstream's) takes the upstream's shape, so a flag asking for
    another would be dropped with only a log line. A StageError says how to get the shape asked for.
    Likewise with `config.model.pretrained` (any stage): the file's architecture replaces the flags'."""
    if "model" in config and config.model.get("pretrained"):
        _refuse_flags_a_checkpoint_replaces(config, flagged)
        return
    stage = config.get("stage")
    if stage not in UPSTREAM_STAGE:
        return
    upstream = upstream_config(config, workdir, UPSTREAM_STAGE[stage])
    if not inherits(config, upstream):
        return
    present = _flat(config.to_dict())
    replaced = _inherited(present, upstream)
    dropped = [key for key in ARCHITECTURE_FIELDS if key in flagged and key in replaced]
    if not dropped:
        return
    where = upstream_dir(config, workdir, UPSTREAM_STAGE[stage])
    values = ", ".join(f"--config.{k}={present[k]} (the upstream's: {replaced[k]})" for k in dropped)
    if "model.patch_size" in dropped:  # the players: never another shape's to choose
        raise StageError(
            f"{values}: a patch is one player, the same for every stage, so the {stage} uses the patch size "
            f"of its upstream run {where}; drop the flag"
        )
    theirs = _field(upstream, "model.variant")
    raise StageError(
        f"{values}: this {stage} takes the architecture of its upstream run {where}, which would replace "
        f"these values. To train the {stage} in another shape (from config.model.pretrained or from "
        f"scratch), name a model variant other than the upstream's{f' ({theirs})' if theirs else ''} in the "
        f"config argument (e.g. configs/{stage}.py:{config.dataset.name},model=<variant>; variants: "
        f"{', '.join(VIT_VARIANTS)}) and set the fields with the flags; to keep the upstream's, drop the "
        "flags"
    )


def _refuse_flags_a_checkpoint_replaces(config, flagged) -> None:
    """`refuse_dropped_flags` with `config.model.pretrained`: architecture flags that differ from what
    `resolve` reads from the file (and `config.model.checkpoint_overrides`). The file is read only when
    such a flag is given; one it cannot read is left to the stage, which reports it."""
    from vitshap_jax.models import checkpoint_architecture

    named = [key for key in ARCHITECTURE_FIELDS if key in flagged]
    if not named:
        return
    path = os.path.expanduser(config.model.pretrained)
    try:
        arch = checkpoint_architecture(path)["model"]
    except (OSError, UserError, ValueError):
        return
    overrides = checkpoint_overrides(config.model.get("checkpoint_overrides", ""))
    theirs = {f"model.{name}": value for name, value in (arch | overrides).items()}
    present = _flat(config.to_dict())
    dropped = [k for k in named if k in theirs and present[k] != theirs[k]]
    if not dropped:
        return
    values = ", ".join(f"--config.{k}={present[k]} (the checkpoint's: {theirs[k]})" for k in dropped)
    raise StageError(
        f"{values}: with config.model.pretrained={config.model.pretrained} the architecture is read from "
        "that file, which would replace these values. A field the file cannot tell (the heads of a fused "
        "qkv, the activation, the epsilon, the pooling) is stated with "
        "--config.model.checkpoint_overrides=field=value,...; another shape cannot start from these "
        "weights: drop config.model.pretrained to train it from scratch, or drop the flags"
    )


def make_optimizer(config, total_steps: int, trainable=None):
    """AdamW with linear warmup and cosine decay to 0, global-norm clipping; `trainable` (a pytree
    of bools like the params, or None for all) freezes the False leaves."""
    o = config.optim
    warmup = o.warmup_steps
    if warmup >= total_steps:
        warmup = total_steps // 10
        logging.warning(
            "optim.warmup_steps=%d >= %d total steps: warming up for %d", o.warmup_steps, total_steps, warmup
        )
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, warmup + 1), 0.0)
    tx = optax.adamw(schedule, weight_decay=o.weight_decay)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def total_steps(config, num_train: int) -> int:
    return (num_train * config.train.epochs) // config.train.batch_size


def create_state(params, tx, mesh, ema_decay: float = 0.0):
    """`{"step", "params", "opt_state"}` replicated on the mesh; with `ema_decay` > 0 also `"ema"`:
    `{"decay", "params"}`, an exponential moving average of the parameters that `apply_gradients` keeps
    and `model_params` hands to validation, the best checkpoint and the test."""
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if ema_decay > 0:
        copy = jax.tree.map(jnp.array, params)  # its own buffers: the train step donates the state
        state["ema"] = {"decay": jnp.asarray(ema_decay, jnp.float32), "params": copy}
    return jax.device_put(state, parallel.replicated(mesh))


def apply_gradients(state, grads, tx):
    """One optimizer update of a train state `{"step", "params", "opt_state"}` (and its `"ema"`: at step
    t the average moves by `1 - min(decay, (1 + t) / (10 + t))`, so that it forgets the initial
    parameters early on, as TensorFlow's ExponentialMovingAverage with `num_updates`)."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
        t = state["step"].astype(jnp.float32)
        decay = jnp.minimum(state["ema"]["decay"], (1 + t) / (10 + t))
        average = jax.tree.map(lambda a, p: a + (1 - decay) * (p - a), state["ema"]["params"], params)
        new["ema"] = {"decay": state["ema"]["decay"], "params": average}
    return new


def model_params(state):
    """The parameters a train state stands for: the moving average where it keeps one
    (`optim.ema_decay` > 0), else the optimizer's own."""
    return state["ema"]["params"] if "ema" in state else state["params"]


def train_and_test(task, config, path: str, mesh, splits, *, stop_after: int | None = None) -> dict:
    """Runs `fit`, then evaluates the best parameters on the test split and writes `results.json`.

    Returns `{"validation", "test", "path"}` (only the validation metrics when `stop_after` cuts the run).
    """
    from vitshap_jax.train.loop import fit

    best_target = ckpt_lib.abstract(task.export(task.state))  # before the first step donates the state
    validation = fit(task, config, path, mesh, splits["train"], stop_after=stop_after)
    if stop_after is not None:
        return validation
    best = ckpt_lib.load_best_params(path, best_target)
    results = {"validation": validation, "test": task.evaluate({"params": best}, "test"), "path": path}
    write_results(path, results)
    return results


def jit_train_step(step_fn, mesh, num_frozen: int = 0):
    """jit `step_fn(state, batch, *frozen)`: state, frozen params replicated; batch sharded; state donated."""
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(rep, data_sharding) + (rep,) * num_frozen,
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def jit_eval_step(step_fn, mesh, num_params: int):
    """jit `step_fn(*params, batch) -> {name: [B] per example}` with the batch sharded."""
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(rep,) * num_params + (data_sharding,), out_shardings=data_sharding)


_LOCKS: dict[str, object] = {}  # stage directories this process holds (open lock files)
LOCK_FILE = ".lock"


def lock_stage_dir(path: str) -> None:
    """Takes the lock of a stage directory for the rest of this process (process 0 of a multi-host run),
    so that two runs never train into one directory: a second one refuses, naming the holder. The lock
    (`flock` on `{path}/.lock`) ends with its process, however it ends."""
    import fcntl
    import socket

    if jax.process_index() != 0 or path in _LOCKS:
        return
    try:
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, LOCK_FILE), "a+")  # noqa: SIM115 -- held open until the process ends
    except OSError as e:
        raise StageError(
            f"cannot write to {path} ({e.strerror}): choose a --workdir you can write to"
        ) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StageError(
            f"{path} is in use by {holder}: wait for that run to end, or use another --workdir"
        ) from None
    except OSError as e:  # a file system without locks (NFS without lockd, Lustre with noflock)
        logging.warning(
            "%s: cannot lock it (%s); going on without a lock: one job per stage directory", path, e
        )
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[path] = f


# Fields a rerun may change: they do not change what the run computes (logging, checkpoint cadence,
# data loading, where files are). Any other difference from the recorded run is refused, or with
# `config.restart` starts the stage afresh.
FREE_FIELDS = (
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.eval_every_epochs",  # which epochs are validated; the training itself is the same
    "dataset.workers",
    "dataset.read_threads",
    "dataset.prefetch",
    "model.remat",
    # How the matmuls round, not which model: a run resumes under another precision, as it does on
    # another machine (where "auto" may resolve otherwise).
    "model.matmul_precision",
    "model.attention_impl",  # which kernel computes the attention, not which model (the same values)
    "model.variant",  # a name; the shape fields it stands for are compared
    "dataset.data_dir",
    "dataset.manual_dir",
    "model.pretrained",
    "model.from_checkpoint",
    "upstream",
    "restart",
    "run_id",
    "upstream_run_id",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every setting that differs, except `FREE_FIELDS`. A field that one of the
    two configs lacks (a run recorded before the field existed) counts only if it has a known default."""
    a, b = _flat(old), _flat(new)
    keys = sorted(((set(a) & set(b)) | ((set(a) | set(b)) & set(_DEFAULTS))) - set(FREE_FIELDS))
    return [
        f"{k}: {a.get(k, _DEFAULTS.get(k))!r} -> {b.get(k, _DEFAULTS.get(k))!r}"
        for k in keys
        if a.get(k, _DEFAULTS.get(k)) != b.get(k, _DEFAULTS.get(k))
    ]


def stage_dir(workdir: str, stage: str, config, upstream: dict | None = None) -> str:
    """`{workdir}/{stage}`, locked for this run, with the config written there.

    The rerun rule: a directory that holds a run of this stage is continued (resumed, or left as it is
    when complete) only if the run has the same settings (`settings_diff`) and was trained from the
    same upstream run (`upstream`, whose `run_id` the stage records as `upstream_run_id`). Otherwise it
    is refused with the differences, or with `config.restart=True` the old run is moved aside to
    `{stage}.replaced-<time>` (nothing is deleted) and the stage starts afresh. Also refuses a
    directory that another run holds.
    """
    import time
    import uuid

    if not workdir:
        raise StageError("--workdir is required: every stage writes {workdir}/{stage}/")
    root = absolute(workdir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise StageError(f"--workdir={workdir} is a file, not a directory: choose another --workdir")
    path = os.path.join(root, stage)
    upstream_id = (upstream or {}).get("run_id", "")
    run_id, move_aside = "", ""
    if os.path.exists(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        old = ckpt_lib.read_config(path)
        new = config.to_dict()
        fixed = UPSTREAM_FIELDS + ARCHITECTURE_FIELDS + ("model.masking", "explainer.architecture")
        setup = [k for k in dict.fromkeys(fixed) if _field(old, k) != _field(new, k)]
        diffs = settings_diff(old, new)
        recorded = old.get("upstream_run_id", "")
        other_upstream = bool(recorded and upstream_id and recorded != upstream_id)
        if (diffs or other_upstream) and config.get("restart"):
            move_aside = "; ".join(diffs) or "another upstream"
        elif setup:
            changes = ", ".join(f"{k}: {_field(old, k)!r} -> {_field(new, k)!r}" for k in setup)
            raise StageError(
                f"{path} holds a {stage} run with a different setup ({changes}); its checkpoints cannot be "
                "resumed. Use another --workdir, or --config.restart=True to move it aside and start over."
            )
        elif diffs:
            raise StageError(
                f"{path} holds a {stage} run with other settings ({'; '.join(diffs)}): rerun with its "
                "settings to resume it, or --config.restart=True to move it aside and start over"
            )
        elif other_upstream:
            raise StageError(
                f"{path} holds a {stage} run trained from another {UPSTREAM[stage]} run than the one in "
                f"{config.get('upstream') or os.path.join(root, UPSTREAM[stage])}: --config.restart=True "
                "moves it aside and trains it again from the current one"
            )
        else:
            run_id = old.get("run_id", "")
    # Every process has decided the same from the same files; only process 0 moves and writes.
    _barrier(f"stage_dir_read:{path}")
    if jax.process_index() == 0:
        if move_aside:
            aside = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            k = 1
            while os.path.exists(aside):
                k += 1
                aside = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{k}"
            lock_stage_dir(path)  # nobody else may be using it while it moves
            os.replace(path, aside)
            _LOCKS.pop(path, None)
            logging.info("%s: the earlier run (%s) moved to %s; starting afresh", path, move_aside, aside)
        lock_stage_dir(path)
        config.run_id = run_id or uuid.uuid4().hex
        config.upstream_run_id = upstream_id
        ckpt_lib.write_config(path, config)
    _barrier(f"stage_dir_written:{path}")
    if jax.process_index() != 0:  # the run_id process 0 chose
        config.run_id = ckpt_lib.read_config(path)["run_id"]
        config.upstream_run_id = upstream_id
    return path


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


UPSTREAM = {"surrogate": "classifier", "explainer": "surrogate"}


def upstream_params(config, workdir: str, upstream_stage: str, mesh):
    """The upstream stage's model (built from its own recorded config, with its masking strategy) and
    best parameters, replicated on `mesh`, after checking that the run matches `config` (dataset,
    classes, normalization, patches: `UPSTREAM_FIELDS`). Looks in `upstream_dir`. The model computes its
    attention with this stage's `config.model.attention_impl`. Returns (params, the upstream's config as
    a dict, model)."""
    from vitshap_jax.models import build_model

    path = upstream_dir(config, workdir, upstream_stage)
    if not os.path.exists(os.path.join(path, ckpt_lib.CONFIG_FILE)):
        raise StageError(
            f"no {upstream_stage} run in {path} ({ckpt_lib.CONFIG_FILE} is missing): run the "
            f"{upstream_stage} stage with the same --workdir first, or set --config.upstream to its directory"
        )
    up = ckpt_lib.read_config(path)
    # A classifier trained on random coalitions (train.mask_patches) can serve as its own surrogate.
    masked_classifier = up.get("stage") == "classifier" and up.get("train", {}).get("mask_patches")
    if up.get("stage") != upstream_stage and not (upstream_stage == "surrogate" and masked_classifier):
        raise StageError(
            f"{path} holds a {up.get('stage')} run, not a {upstream_stage} run: point config.upstream at the "
            f"{upstream_stage} directory (or leave it unset for {{workdir}}/{upstream_stage})"
        )
    new = config.to_dict()
    changed = [k for k in UPSTREAM_FIELDS if _field(up, k) != _field(new, k)]
    if changed:
        diffs = "; ".join(
            f"config.{k}={_field(new, k)!r}, the {upstream_stage} has {_field(up, k)!r}" for k in changed
        )
        raise StageError(f"{path}: the {upstream_stage} run does not match this config: {diffs}")
    # The attention core is this stage's choice (the same model whichever, and the upstream's passes are
    # most of a surrogate's or explainer's step); the returned config stays the upstream's record.
    impl = config.model.get("attention_impl", "auto")
    model = build_model({**up, "model": {**up["model"], "attention_impl": impl}})
    target = abstract_params(model, config.dataset.image_size, parallel.replicated(mesh))
    return ckpt_lib.load_best_params(path, target), up, model


def write_results(stage_path: str, results: dict) -> None:
    """`{stage_path}/results.json` (process 0; atomic: it marks the stage as finished)."""
    if jax.process_index() == 0:
        write_json(os.path.join(stage_path, "results.json"), results, sort_keys=True)


def open_splits(config, mesh=None):
    """The three splits, after checking what can be checked before a stage writes anything: the data
    fit the config (`data.open_split`) and the batch fits the devices and the training split."""
    splits = {split: data.open_split(config, split) for split in data.SPLITS}
    t = config.train
    if mesh is not None:
        try:
            parallel.check_batch_size(t.batch_size, mesh)
        except ValueError as e:
            raise StageError(str(e)) from None
    if len(splits["train"]) * t.epochs < t.batch_size:
        raise StageError(
            f"config.train.batch_size={t.batch_size} is larger than the {len(splits['train'])} training "
            f"examples x {t.epochs} epochs: lower the batch size"
        )
    return splits
