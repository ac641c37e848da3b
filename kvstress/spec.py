"""Method specs and the policy registry: the one name for a cache policy and its sizes.

A policy declares itself once, with a `Policy`: its name, its parameters (a frozen
dataclass whose fields, in order, are the numbers of its spec string, with defaults
and validation), a one-line description and the cache that implements it. The grammar,
the defaults behind the size flags, `--method all` and `kvstress policies` all derive
from those declarations. The built-in policies live in `kvstress/caches/`, one file
each; policies written elsewhere register through the entry point group
`kvstress.policies` (each entry point names a `Policy`), loaded once, on first use.

A spec has two spellings that mean the same thing: the string ``h2o_4_32_256`` and
the fields ``MethodSpec("h2o", sink=4, window=32, capacity=256)``. Results, plots and
reports name every method by its string; the CLI accepts either, the fields through
the generic size flags (`spec_from_flags`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import KvstressError

ENTRY_POINT_GROUP = "kvstress.policies"

# The generic size flags' default capacity; the other sizes default per policy (Params).
DEFAULT_CAPACITY = 256

_NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*")
_SPEC_PATTERN = re.compile(r"([a-z][a-z0-9]*)((?:_-?\d+)*)")


class SpecError(KvstressError, ValueError):
    """A method spec that cannot be built; the message says how to fix it."""


# -- what a policy declares ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Params:
    """Base of a policy's parameters: subclass it as a frozen, kw_only dataclass of ints.

    The fields, in declaration order, are the spec string's numbers, each written as the
    upper-case initial of its name in the spec form (sink → S, window → W, capacity → C).
    A field without a default must be given. The generic sizes are checked here for
    every policy that has them:

        sink       tokens from the start kept for good (attention sinks), 0 or more
        window     most recent tokens kept; None resolves to capacity // 8 (at least
                   `min_window`)
        capacity   most tokens held per sequence and KV head; positive, and above
                   sink + window so that the policy has slots of its own to choose

    Policy-specific rules go in `check()`, raising SpecError with a message that names
    the fix.
    """

    min_window = 0  # the smallest recent window the policy works with
    rest = "slots to choose"  # what fills capacity - sink - window, for the message when nothing does

    def __post_init__(self) -> None:
        names = {field.name for field in dataclasses.fields(self)}
        capacity = getattr(self, "capacity", None)
        if "capacity" in names and capacity <= 0:
            raise SpecError(f"capacity must be positive, got {capacity}")
        if "sink" in names and self.sink < 0:
            raise SpecError(f"sink must be 0 or more, got {self.sink}")
        if "window" in names:
            if self.window is None:
                object.__setattr__(self, "window", max(self.min_window, capacity // 8))
            elif self.window < self.min_window:
                raise SpecError(f"window must be at least {self.min_window}, got {self.window}")
        if "capacity" in names:
            sink, window = getattr(self, "sink", 0), getattr(self, "window", 0)
            if capacity <= sink + window:
                kept = f"{sink} sinks" + (f" and a {window}-token window" if window else "")
                raise SpecError(f"capacity {capacity} leaves no {self.rest} after {kept}: "
                                f"use a capacity above {sink + window}")
        self.check()

    def check(self) -> None:
        """Policy-specific validation, after the generic sizes are checked."""

    @classmethod
    def default_text(cls, field: dataclasses.Field) -> str:
        if field.name == "window" and field.default is None:
            return f"capacity // 8{f' (at least {cls.min_window})' if cls.min_window else ''}"
        if field.default is dataclasses.MISSING:
            return f"{DEFAULT_CAPACITY} (--capacity)" if field.name == "capacity" else "required"
        return str(field.default)


def _letter(field: dataclasses.Field) -> str:
    """How a parameter is written in a spec form: the upper-case initial of its name."""
    return field.name[0].upper()


@dataclass(frozen=True)
class Policy:
    """A cache policy as the registry knows it.

    cache: a `kvstress.caches.CompressedCache` subclass for a policy with a capacity
    (built with the model's attention links; position modes, lazy eviction and
    --compile apply), or a function `(spec, model) -> transformers Cache` for one
    without (transformers' own caches: the full cache, the quantized cache).
    """

    name: str
    params: type[Params]
    description: str
    cache: Callable[..., Any]
    in_all: bool = False  # run by `--method all`
    # Whether each KV head decides its own evictions. A policy that pools a layer's heads
    # (the authors' TOVA) cannot run sharded by heads (--tp) without gathering the ranks.
    per_head: bool = True

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"policy name {self.name!r} must be lower-case letters and digits, starting with a letter")
        # A dataclass subclassing Params is frozen (dataclasses refuse a thawed child of a frozen one).
        if not (isinstance(self.params, type) and issubclass(self.params, Params)):
            raise TypeError(f"policy {self.name}: params must be a dataclass subclassing kvstress.spec.Params")

    @property
    def fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.params)

    @property
    def form(self) -> str:
        """The spec string's shape, e.g. ``h2o_S_W_C``."""
        return "_".join([self.name] + [_letter(field) for field in self.fields])

    @property
    def is_compressed(self) -> bool:
        """Whether the policy holds a fixed capacity (a kvstress CompressedCache)."""
        return any(field.name == "capacity" for field in self.fields)


_builtin: dict[str, Policy] = {}  # kvstress's own policies, registered by kvstress.caches
_plugins: dict[str, Policy] | None = None  # from the entry points, read on first use


def register_policy(policy: Policy) -> Policy:
    """Add a built-in policy to the registry; a name can be registered once."""
    if policy.name in _builtin:
        raise ValueError(f"a policy named {policy.name!r} is already registered")
    _builtin[policy.name] = policy
    return policy


def _load_plugins() -> dict[str, Policy]:
    """The policies that installed packages declare in the entry point group.

    A plugin that fails to load, or takes a name already used, is skipped with a
    warning, so that one broken package does not stop runs of the other policies.
    """
    plugins: dict[str, Policy] = {}
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            policy = entry_point.load()
            if not isinstance(policy, Policy):
                raise TypeError(f"it names a {type(policy).__name__}, not a kvstress.spec.Policy")
            if policy.name in _builtin or policy.name in plugins:
                raise ValueError(f"the name {policy.name!r} is taken: rename the plugin's policy")
        except Exception as error:  # noqa: BLE001 - any failure of third-party code is reported the same way
            warnings.warn(f"kvstress: skipped policy plugin {entry_point.name!r} ({entry_point.value}): {error}",
                          stacklevel=3)
            continue
        plugins[policy.name] = policy
    return plugins


def reload_plugins() -> None:
    """Read the entry points again on next use: after a plugin package was installed or
    removed in a running process (the registry reads them once otherwise)."""
    global _plugins
    _plugins = None


def _policies() -> dict[str, Policy]:
    global _plugins
    if _plugins is None:
        _plugins = _load_plugins()
    return {**_builtin, **_plugins}


def registered_policies() -> tuple[Policy, ...]:
    """Every registered policy: the built-in ones in their order, then the plugins by name."""
    return tuple(_policies().values())


def find_policy(name: str) -> Policy:
    policy = _policies().get(name)
    if policy is None:
        raise SpecError(f"unknown method {name!r}: {_choices()}")
    return policy


def _choices() -> str:
    """What the user can write instead, the `--method all` policies first."""
    policies = registered_policies()
    defaults = [policy for policy in policies if policy.in_all]
    others = [policy.form for policy in policies if not policy.in_all]
    forms = [policy.form for policy in defaults]
    examples = ", ".join(_example(policy) for policy in defaults)
    text = f"write {', '.join(forms[:-1])} or {forms[-1]} (e.g. {examples})"
    if others:
        text += f", or one of {', '.join(others)} (`kvstress policies` describes them)"
    return text


# -- specs ----------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class MethodSpec:
    """A policy and its parameters: `MethodSpec("h2o", sink=4, window=32, capacity=256)`.

    Fields not given take the policy's defaults (a capacity has none here: the size flags
    default it, see `spec_from_flags`). The parameters read as attributes of the spec
    (`spec.capacity`, `spec.bits`); the generic sizes read as None (capacity) or 0 (sink,
    window) for a policy without them.
    """

    method: str
    params: Params

    def __init__(self, method: str, **values: int) -> None:
        policy = find_policy(method)
        names = [field.name for field in policy.fields]
        for name in values:
            if name not in names:
                raise SpecError(f"{method} takes no {name}: give it no {name} (drop --{name}); "
                                f"its spec is {policy.form}")
        for field in policy.fields:
            if field.name not in values and field.default is dataclasses.MISSING:
                raise SpecError(f"{method} needs a {field.name}: add --{field.name} N (its spec is {policy.form})")
        try:
            params = policy.params(**values)
        except SpecError as error:
            raise SpecError(f"{method} {error}") from None
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "params", params)

    def __getattr__(self, name: str):
        # Called only for names that are not the spec's own: the policy's parameters.
        params = self.__dict__.get("params")
        if params is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(params, name)
        except AttributeError:
            raise AttributeError(f"{self.method} has no parameter {name!r}") from None

    @property
    def policy(self) -> Policy:
        return find_policy(self.method)

    @property
    def capacity(self) -> int | None:
        """Most tokens held per sequence and KV head; None for a cache that grows with the text."""
        return getattr(self.params, "capacity", None)

    @property
    def sink(self) -> int:
        return getattr(self.params, "sink", 0)

    @property
    def window(self) -> int:
        return getattr(self.params, "window", 0)

    @property
    def is_compressed(self) -> bool:
        """A fixed-capacity kvstress cache, to which position modes, lazy eviction and --compile
        apply; False for transformers' own caches (the full cache, the quantized one)."""
        return self.policy.is_compressed

    @property
    def name(self) -> str:
        """The spec string, e.g. ``h2o_4_32_256``."""
        return "_".join([self.method] + [str(getattr(self.params, f.name)) for f in dataclasses.fields(self.params)])

    def __str__(self) -> str:
        return self.name


def parse_spec(text: str) -> MethodSpec:
    """Parse a spec string: the policy's name, then its parameters' numbers (``h2o_4_32_256``)."""
    cleaned = text.strip().lower()
    match = _SPEC_PATTERN.fullmatch(cleaned)
    if not match:
        raise SpecError(f"cannot read method spec {text!r}: {_choices()}")
    policy = find_policy(match.group(1))
    numbers = [int(part) for part in match.group(2).split("_")[1:]]
    if len(numbers) != len(policy.fields):
        raise SpecError(f"method spec {text!r} should look like {policy.form}")
    return MethodSpec(policy.name, **{field.name: value for field, value in zip(policy.fields, numbers)})


def as_spec(spec: str | MethodSpec) -> MethodSpec:
    """Accept either spelling."""
    return spec if isinstance(spec, MethodSpec) else parse_spec(spec)


def spec_from_flags(name: str, *, capacity: int | None = None, sink: int | None = None,
                    window: int | None = None) -> MethodSpec:
    """The spec for `--method NAME` with the generic size flags (None where not given).

    A flag applies to the policies that have the parameter and is ignored by the others,
    since one set of flags serves a list of methods. Sizes not given take the policy's
    defaults and a capacity of `DEFAULT_CAPACITY`.
    """
    policy = find_policy(name)
    flags = {"capacity": DEFAULT_CAPACITY if capacity is None else capacity, "sink": sink, "window": window}
    names = {field.name for field in policy.fields}
    return MethodSpec(name, **{key: value for key, value in flags.items() if key in names and value is not None})


def all_methods() -> tuple[str, ...]:
    """The policies `--method all` runs: the seed experiment's full cache, StreamingLLM and H2O."""
    return tuple(policy.name for policy in registered_policies() if policy.in_all)


def method_specs(values: Iterable[str], *, capacity: int | None = None, sink: int | None = None,
                 window: int | None = None) -> tuple[MethodSpec, ...]:
    """--method values (policy names, spec strings, `all`, or comma lists of them) with the size
    flags → specs, without duplicates, in the order given (`all` expanding in place)."""
    names: list[str] = []
    for value in values or ["all"]:
        for part in (part.strip().lower() for part in value.split(",")):
            if part == "all":
                names.extend(all_methods())
            elif part:
                names.append(part)
    specs: dict[MethodSpec, None] = {}
    for name in names:
        is_name = _NAME_PATTERN.fullmatch(name) is not None
        spec = spec_from_flags(name, capacity=capacity, sink=sink, window=window) if is_name else parse_spec(name)
        specs.setdefault(spec)
    return tuple(specs)


@dataclass(frozen=True)
class PolicyDescription:
    """One row of `kvstress policies`."""

    name: str
    form: str  # e.g. h2o_S_W_C
    parameters: str  # e.g. "S sink = 4, W window = capacity // 8 (at least 1), C capacity = 256 (--capacity)"
    description: str
    example: str  # the spec `--method NAME` gives with no size flags, e.g. h2o_4_32_256


def describe_policies() -> tuple[PolicyDescription, ...]:
    return tuple(
        PolicyDescription(
            name=policy.name,
            form=policy.form,
            parameters=", ".join(f"{_letter(f)} {f.name} = {policy.params.default_text(f)}"
                                 for f in policy.fields),
            description=policy.description,
            example=_example(policy),
        )
        for policy in registered_policies()
    )


def _example(policy: Policy) -> str:
    try:
        return spec_from_flags(policy.name).name
    except SpecError:  # a plugin parameter without a default: only its spec string sets it
        return policy.form
