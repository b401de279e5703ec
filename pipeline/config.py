"""Loading and validating YAML recipes, with ``--set stage.param=value`` overrides.

A recipe names its stages in the order they run::

    name: qwen-vl
    stages:
      - stage: html
      - stage: length
        min_words: 2
      - stage: clip_score
        precision: bf16
        resources: {num_gpus: 0.5, pool_size: 2, batch_size: 256}

A stage's settings say what it computes (all fingerprinted but its thresholds); its ``resources`` block says how
Ray runs it (CPUs, GPUs, pool size, batch size, device) and is never fingerprinted. Every key is checked against
the stage's settings, so a typo is an error naming the known keys rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.settings import ConfigError, build_params  # ConfigError is also imported from here
from pipeline.shards import ReadParams
from stages import STAGES, Stage, StageParams, StageResources

TOP_LEVEL_KEYS = {"name", "description", "read", "stages"}
RESOURCES = "resources"  # a stage's block of how Ray runs it (``--set clip_score.resources.num_gpus=0``)
READ_SECTION = "read"  # how shards are read: batch bounds and member limits (``--set read.batch_samples=256``)
DERIVED_KEYS = {"base", "set", "name", "description"}  # a recipe that starts from another one


@dataclasses.dataclass
class StageSpec:
    name: str  # unique within the recipe; also the prefix of --set keys
    kind: str  # key of STAGES
    params: StageParams
    resources: StageResources = dataclasses.field(default_factory=StageResources)

    @property
    def stage_class(self) -> type[Stage]:
        return STAGES[self.kind]

    def build(self) -> Stage:
        stage = self.stage_class(self.params)
        stage.resources = self.resources
        return stage


@dataclasses.dataclass
class CurationConfig:
    name: str
    description: str
    stages: list[StageSpec]
    read: ReadParams = dataclasses.field(default_factory=ReadParams)

    @property
    def enabled_stages(self) -> list[StageSpec]:
        return [s for s in self.stages if s.params.enabled]

    def fingerprint(self) -> str:
        """Hash of the settings that change annotations; thresholds and resources are left out."""
        payload = [
            {"name": s.name, "kind": s.kind, "version": getattr(s.stage_class, "version", 1),
             "settings": s.stage_class.annotation_settings(s.params)}
            for s in self.enabled_stages
        ]
        payload.append({"name": READ_SECTION, "settings": self.read.annotation_settings()})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        stages = []
        for spec in self.stages:
            entry: dict[str, Any] = {"stage": spec.kind}
            if spec.name != spec.kind:
                entry["name"] = spec.name
            entry.update(dataclasses.asdict(spec.params))
            entry[RESOURCES] = dataclasses.asdict(spec.resources)
            stages.append(entry)
        return {"name": self.name, "description": self.description, "read": dataclasses.asdict(self.read),
                "stages": stages}


def load_config(path: str | Path, overrides: list[str] | None = None) -> CurationConfig:
    """Load a recipe. A recipe may start from another (``base: qwen-vl.yaml``, relative to itself) and change
    settings with a ``set:`` mapping, written like --set keys; command-line overrides apply last."""
    path = Path(path)
    raw = _read_yaml(path)
    extra: list[str] = []
    if isinstance(raw, dict) and "base" in raw:
        unknown = set(raw) - DERIVED_KEYS
        if unknown:
            raise ConfigError(f"{path}: a recipe with 'base' takes only {sorted(DERIVED_KEYS)}, not {sorted(unknown)}")
        settings = raw.get("set") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: 'set' must map STAGE.KEY to a value")
        base = _read_yaml(path.parent / str(raw["base"]))
        if not isinstance(base, dict) or "base" in base:
            raise ConfigError(f"{path}: base {raw['base']} must be a plain recipe (no base of its own)")
        base.update({k: raw[k] for k in ("name", "description") if k in raw})
        extra = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        raw = base
    return parse_config(raw, extra + (overrides or []), source=str(path))


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a recipe such as configs/qwen-vl.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def parse_config(raw: Any, overrides: list[str], source: str = "config") -> CurationConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'name' and 'stages'")
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; known keys: {sorted(TOP_LEVEL_KEYS)}")
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: 'stages' must be a non-empty list of stages")
    entries = [dict(e) if isinstance(e, dict) else e for e in entries]
    names = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"{source}: stages[{i}] must be a mapping with a 'stage' key (one of {sorted(STAGES)})")
        names.append(str(entry.get("name", entry["stage"])))
    if READ_SECTION in names:
        raise ConfigError(f"{source}: '{READ_SECTION}' is reserved for the read settings; give that stage another name")
    read = raw.get(READ_SECTION) or {}
    if not isinstance(read, dict):
        raise ConfigError(f"{source}: '{READ_SECTION}' must be a mapping of read settings")
    raw = {**raw, "stages": entries, READ_SECTION: dict(read)}
    for override in overrides:
        _apply_override(raw, names, override, source)
    specs = []
    for i, entry in enumerate(raw["stages"]):
        specs.append(_parse_stage(entry, f"{source}: stages[{i}]"))
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ConfigError(f"{source}: stage name(s) {sorted(duplicated)} used twice; give each a distinct 'name'")
    read_params = build_params(ReadParams, raw[READ_SECTION], f"{source}: {READ_SECTION}")
    try:
        read_params.validate()
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config = CurationConfig(name=str(raw.get("name", Path(source).stem)),
                            description=str(raw.get("description", "")), stages=specs, read=read_params)
    _check_step_order(config, source)
    _check_embeddings_saved(config, source)
    return config


def _check_embeddings_saved(config: CurationConfig, source: str) -> None:
    """semantic_dedup reads the image embeddings that a clip_score stage before it saves."""
    enabled = config.enabled_stages
    for index, spec in enumerate(enabled):
        if spec.stage_class.name != "semantic_dedup":
            continue
        savers = [s for s in enabled[:index] if getattr(s.params, "save_embeddings", False)]
        if not savers:
            raise ConfigError(f"{source}: stage {spec.name} needs the CLIP image embeddings: enable a clip_score "
                              "stage before it with save_embeddings: true")


def _check_step_order(config: CurationConfig, source: str) -> None:
    from pipeline.steps import StepPlan

    try:
        StepPlan.of(config.enabled_stages)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _apply_override(raw: dict, names: list[str], override: str, source: str) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set length.min_words=3")
    value = yaml.safe_load(value_text) if value_text.strip() else ""
    parts = key.split(".")
    if parts[0] in ("name", "description") and len(parts) == 1:
        raw[parts[0]] = value
        return
    if parts[0] == READ_SECTION and len(parts) == 2:
        raw[READ_SECTION][parts[1]] = value
        return
    if parts[0] not in names or len(parts) < 2:
        raise ConfigError(f"--set {key}: no stage named {parts[0]!r} in {source}; stages: {names}")
    target = raw["stages"][names.index(parts[0])]
    for part in parts[1:-1]:
        nested = target.get(part)
        if nested is None:
            nested = {} if part == RESOURCES else _default_of(target, part)
        if not isinstance(nested, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        target[part] = nested = dict(nested)
        target = nested
    target[parts[-1]] = value


def _default_of(entry: dict, field_name: str) -> Any:
    cls = STAGES.get(entry.get("stage"))
    if cls is None:
        return None
    defaults = {f.name: f for f in dataclasses.fields(cls.Params)}
    field = defaults.get(field_name)
    if field is None:
        return None
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _parse_stage(entry: dict, where: str) -> StageSpec:
    kind = entry["stage"]
    if kind not in STAGES:
        raise ConfigError(f"{where}: unknown stage {kind!r}; known stages: {sorted(STAGES)}")
    cls = STAGES[kind]
    name = str(entry.get("name", kind))
    settings = {k: v for k, v in entry.items() if k not in ("stage", "name", RESOURCES)}
    moved = sorted(set(settings) & {f.name for f in dataclasses.fields(cls.Resources)})
    if moved:
        raise ConfigError(
            f"{where} ({name}): {moved} say how Ray runs the stage: put them in its '{RESOURCES}' block "
            f"({RESOURCES}: {{{moved[0]}: ...}}, or --set {name}.{RESOURCES}.{moved[0]}=...)"
        )
    params = build_params(cls.Params, settings, f"{where} ({name})")
    block = entry.get(RESOURCES) or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where} ({name}): '{RESOURCES}' must be a mapping, e.g. {RESOURCES}: {{num_cpus: 2}}")
    resources = build_params(cls.Resources, block, f"{where} ({name}) {RESOURCES}")
    try:
        getattr(resources, "pool_bounds", None)  # checks an actor pool's size
    except ValueError as exc:
        raise ConfigError(f"{where} ({name}) {RESOURCES}: {exc}") from None
    try:
        cls(params)  # constructing validates cross-field settings (e.g. rule names) early, on the driver
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from None
    return StageSpec(name=name, kind=kind, params=params, resources=resources)
