"""Which ``_target_`` a run folder's config may name before Hydra instantiates it.

``hydra.utils.instantiate`` imports and calls every ``_target_`` it meets, so a run folder received
from someone else is code. Its config is checked first against a :class:`TargetPolicy`: the exact
targets written in trusted config trees, explicit extras, and *families* of classes.
"""
from __future__ import annotations

import functools
import importlib
import importlib.resources
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError

from medtrust.runs.resolvers import PROJECT_ROOT

#: Always refused, checked before anything else: loaders, code runners, the file system, our own I/O.
DENIED: tuple[str, ...] = (
    "torch.load", "torch.hub", "torch.jit.load", "torch.package", "torch.serialization", "numpy.load",
    "pandas.read_pickle", "pickle", "_pickle", "cloudpickle", "joblib", "dill", "shelve", "marshal",
    "builtins", "eval", "exec", "__import__", "os", "posix", "sys", "subprocess", "pathlib", "shutil",
    "importlib", "runpy", "ctypes", "medtrust.utils", "medtrust.runs",
)
#: Module prefix -> base class its members must subclass (classes only: never a function by family).
FAMILIES: tuple[tuple[str, str], ...] = (
    ("torch.optim", "torch.optim.Optimizer"),
    ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.LRScheduler"),
    ("torch.nn", "torch.nn.Module"),
    ("monai.losses", "torch.nn.Module"),
    ("monai.networks.nets", "torch.nn.Module"),
    ("medtrust.nets", "torch.nn.Module"),
    ("medtrust.losses", "torch.nn.Module"),
    ("medtrust.xai.methods", "medtrust.xai.methods.ExplanationMethod"),
    ("lightning.pytorch.callbacks", "lightning.pytorch.callbacks.Callback"),
)
# Resolvers that turn text into config nodes: at resolve time they could create a `_target_`.
_CONTAINER_RESOLVERS = frozenset({"oc.create", "oc.decode"})
_HOW = ("To allow a target on purpose, pass the config directory that defines it on this command line "
        "(hydra.searchpath=[file:///abs/path/conf]) or list it in security.allow_targets=[<target>]; "
        "deny-listed targets cannot be allowed.")


class UnsafeTargetError(ValueError):
    """A config names a ``_target_`` outside the policy (or could build one while resolving)."""


def is_denied(target: str) -> bool:
    """True if ``target`` is on the hard deny-list :data:`DENIED` (itself or anything under it)."""
    return any(target == p or target.startswith(p + ".") for p in DENIED)


@functools.lru_cache(maxsize=None)
def _family_member(target: str, families: tuple[tuple[str, str], ...]) -> bool:
    module, _, name = target.rpartition(".")
    for prefix, base_path in families:
        if module != prefix and not module.startswith(prefix + "."):
            continue  # never import a module outside the families to decide
        try:
            obj = getattr(importlib.import_module(module), name, None)
            base_mod, _, base_name = base_path.rpartition(".")
            base = getattr(importlib.import_module(base_mod), base_name)
        except ImportError:
            continue
        if isinstance(obj, type) and issubclass(obj, base):
            return True
    return False


@dataclass(frozen=True)
class TargetPolicy:
    """The targets a config may instantiate.

    Args:
        exact: dotted names allowed as written (from trusted config trees and explicit extras).
        families: ``(module prefix, base class)`` pairs; a member is allowed only if it resolves
            to a class subclassing the base.

    The deny-list :data:`DENIED` is checked first and wins even over ``exact``.
    """

    exact: frozenset[str] = frozenset()
    families: tuple[tuple[str, str], ...] = FAMILIES

    def allows(self, target: str) -> bool:
        """True if ``target`` (a dotted name, no interpolation) may be instantiated."""
        if not all(p.isidentifier() for p in target.split(".")) or is_denied(target):
            return False  # `torch..load` is still torch.load to Hydra
        return target in self.exact or _family_member(target, self.families)


def _leaves(node: Any, path: str = "") -> Iterator[tuple[str, bool, Any]]:
    """``(key path, is a _target_, value)`` for every leaf; a ``_target_`` is a leaf whatever its type."""
    if isinstance(node, Mapping):
        items = [(f"{path}.{k}" if path else str(k), k == "_target_", v) for k, v in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(f"{path}[{i}]", False, v) for i, v in enumerate(node)]
    else:
        yield path, False, node
        return
    for sub, is_target, value in items:
        if is_target:
            yield sub, True, value
        else:
            yield from _leaves(value, sub)


def config_tree_targets(dirs: Iterable[Path]) -> set[str]:
    """Every string ``_target_`` in the YAML files under ``dirs`` (recursively; a file is read as is).

    Raises:
        ValueError: a file is not valid YAML (read with ``yaml.safe_load``: no code runs).
    """
    out: set[str] = set()
    for d in map(Path, dirs):
        files = [d] if d.is_file() else sorted([*d.rglob("*.yaml"), *d.rglob("*.yml")])
        for f in files:
            try:
                data = yaml.safe_load(f.read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"{f}: not valid YAML ({err})") from err
            out |= {v for _, is_target, v in _leaves(data) if is_target and isinstance(v, str)}
    return out


def searchpath_dirs(searchpath: Sequence[str]) -> list[Path]:
    """Config directories of ``hydra.searchpath`` entries: ``file://<dir>``, ``<dir>`` or ``pkg://<package>``.

    Pass only the current command line's entries, never a run folder's own ``.hydra/hydra.yaml``.

    Raises:
        ValueError: another scheme.
    """
    out = []
    for entry in map(str, searchpath):
        scheme, sep, rest = entry.partition("://")
        scheme, rest = (scheme, rest) if sep else ("file", entry)
        if scheme == "file":
            out.append(Path(rest).expanduser())
        elif scheme == "pkg":  # Hydra imports the package to read it as well; the user named it
            try:
                out.append(Path(str(importlib.resources.files(rest.replace("/", ".").strip(".")))))
            except (ImportError, TypeError):
                continue  # nothing to trust: fewer targets allowed, never more
        else:
            raise ValueError(f"hydra.searchpath entry {entry!r}: scheme {scheme!r} not supported "
                             "(file://<dir>, <dir> or pkg://<package>)")
    return out


@functools.lru_cache(maxsize=32)
def _policy(searchpath: tuple[str, ...], extra: tuple[str, ...]) -> TargetPolicy:
    dirs = [PROJECT_ROOT / "conf", *searchpath_dirs(searchpath)]
    return TargetPolicy(exact=frozenset(config_tree_targets(dirs)) | frozenset(extra))


def default_policy(searchpath: Sequence[str] = (), extra: Sequence[str] = ()) -> TargetPolicy:
    """The project's ``conf/`` + the ``hydra.searchpath`` trees + ``extra`` targets + :data:`FAMILIES`.

    Cached per arguments (building it reads every YAML file of the trees).

    Raises:
        ValueError: an ``extra`` target is deny-listed (:data:`DENIED`), so it could never be allowed.
    """
    bad = [t for t in map(str, extra) if is_denied(t)]
    if bad:
        raise ValueError(f"security.allow_targets: {bad} are deny-listed and can never be allowed ({DENIED})")
    return _policy(tuple(map(str, searchpath)), tuple(map(str, extra)))


def _builds_nodes(value: str) -> bool:
    """True if an interpolation can create config nodes while resolving (Hydra 1.3 resolves the whole
    config before instantiating): a dict literal, ``oc.create``/``oc.decode``, a resolver named by
    an interpolation, or text OmegaConf cannot parse."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P
    from omegaconf.grammar_parser import parse

    try:
        stack: list[Any] = [parse(value)]
    except GrammarParseError:
        return True
    while stack:
        node = stack.pop()
        if isinstance(node, P.DictContainerContext):
            return True
        name = node.getText() if isinstance(node, P.ResolverNameContext) else ""
        if name in _CONTAINER_RESOLVERS or "${" in name:
            return True
        stack.extend(getattr(node, "children", None) or [])
    return False


def _target_problem(target: Any, policy: TargetPolicy) -> str | None:
    if not isinstance(target, str):
        return f"not a string ({type(target).__name__})"
    if "${" in target:
        return "an interpolation (it could resolve to any callable)"
    if is_denied(target):
        return "always refused (deny-list: loaders, builtins, os/sys/subprocess/pathlib, medtrust.utils/runs)"
    if not policy.allows(target):
        return "not in a trusted config tree or security.allow_targets, not a class of an allowed family"
    return None


def check_targets(cfg: DictConfig | ListConfig | Mapping[str, Any], where: str,
                  policy: TargetPolicy) -> None:
    """Refuse a config before Hydra instantiates any of it.

    Walks the whole config without resolving interpolations (dicts and lists, any depth).

    Args:
        cfg: the config (e.g. a run's ``.hydra/config.yaml``).
        where: its file, for the message.
        policy: what may be instantiated, e.g. :func:`default_policy`.

    Raises:
        UnsafeTargetError: a ``_target_`` that is not a string, is an interpolation or is not allowed
            by ``policy``, or an interpolation that could build one; the message names every key path.
    """
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    problems = []
    for path, is_target, value in _leaves(tree):
        if is_target:
            problem = _target_problem(value, policy)
        elif isinstance(value, str) and "${" in value and _builds_nodes(value):
            problem = "an interpolation that could build a _target_ (dict literal, oc.create, oc.decode)"
        else:
            continue
        if problem:
            problems.append(f"  {path}={value!r}: {problem}")
    if problems:
        raise UnsafeTargetError(f"{where}: refusing to instantiate this config:\n" + "\n".join(problems)
                                + f"\n{_HOW}")
