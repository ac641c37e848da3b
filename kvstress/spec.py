"""Method specs and the policy registry: the one name for a cache policy and its sizes.

A policy declares itself once, with a `Policy`: its name, its parameters (a frozen
dataclass whose fields, in order, are the numbers of its spec string, with defaults
and validation), a one-line description and the cache that implements it. The grammar,
the defaults behind the size flags, `--method all` and `kvstress policies` all derive
from those declarations. The built-in policies are declared in `kvstress/policies.py`
(torch-free: a spec is checked before torch loads) and implemented in `kvstress/caches/`,
one file each; policies written elsewhere register through the entry point group
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
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points

from .errors import SpecError
from .policies import BUILTIN_POLICIES
from .policy import DEFAULT_CAPACITY, NAME_PATTERN, Params, Policy, letter

ENTRY_POINT_GROUP = "kvstress.policies"

_SPEC_PATTERN = re.compile(r"([a-z][a-z0-9]*)((?:_-?\d+)*)")


_builtin: dict[str, Policy] = {policy.name: policy for policy in BUILTIN_POLICIES}  # kvstress's own (policies.py)
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
    policy = _builtin.get(name) or _policies().get(name)  # a plugin cannot take a built-in name
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


def all_methods(*, plugins: bool = True) -> tuple[str, ...]:
    """The policies `--method all` runs: the seed experiment's full cache, StreamingLLM and H2O.
    plugins=False: the built-in ones only, without loading the plugins (the CLI's help)."""
    return tuple(policy.name for policy in (registered_policies() if plugins else _builtin.values()) if policy.in_all)


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
    flags = {"capacity": capacity, "sink": sink, "window": window}
    for name in names:
        if NAME_PATTERN.fullmatch(name) is not None:
            spec = spec_from_flags(name, **flags)
        else:
            spec = parse_spec(name)
            _refuse_contradicting_flags(spec, flags)
        specs.setdefault(spec)
    return tuple(specs)


def _refuse_contradicting_flags(spec: MethodSpec, flags: dict[str, int | None]) -> None:
    """A spec string sets its sizes itself; a size flag that says otherwise is a mistake to name,
    not a value to drop in silence (a flag that agrees, or that the policy lacks, is fine)."""
    names = {field.name for field in dataclasses.fields(spec.params)}
    for flag, value in flags.items():
        if value is not None and flag in names and getattr(spec.params, flag) != value:
            fixed = MethodSpec(spec.method, **{**{name: getattr(spec.params, name) for name in names}, flag: value})
            raise SpecError(f"{spec.name} sets {flag} {getattr(spec.params, flag)} but --{flag} {value} was given: "
                            f"drop --{flag}, or write {fixed.name}")


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
            parameters=", ".join(f"{letter(f)} {f.name} = {policy.params.default_text(f)}"
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
