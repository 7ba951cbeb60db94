"""The one ``.pt2`` layout accepted: what ``torch.export.save`` of the pinned torch (2.14) writes.

``torch.export.load`` runs code from a hostile archive in more ways than pickles (all checked
against torch 2.14 by building the archives with ``torch.export.save`` and editing them):

- pickles read with ``weights_only=False``: weights and constants whose config entry says
  ``use_pickle: true`` (``_package._load_state_dict``/``_load_constants``), the legacy
  ``data/weights/model.pt``/``data/constants/model.pt`` members, the sample inputs when their
  ``weights_only=True`` load fails (``serialize.deserialize_torch_artifact``), and the whole
  root-level pre-2.8 layout (``serialized_*.pt`` beside ``serialized_exported_program.json``)
  that ``torch.export.load`` falls back to when the new layout fails;
- ``pickle.loads`` of ``opaque_obj_*`` constants and the TorchScript unpickler for
  ``custom_obj_*`` ones; neither is covered by ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``;
- ``sympy.sympify`` (an ``eval``) of every ``expr_str`` in ``models/model.json``;
- ``importlib.import_module`` of names in the program's pytree specs (enum and defaultdict
  contexts), ``exec`` of its ``guards_code`` (``ExportedProgram.module(check_guards=True)``),
  and call targets resolved by name through ``torch``, ``math`` and ``operator``;
- AOTInductor members (``data/aotinductor/``), which are shared libraries.

``worker.engine`` sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which turns every ``torch.load`` into
a weights-only one; this module closes the rest by accepting only the members and entries the
saver writes: one root folder, the fixed files below, ``weight_<n>``/``tensor_<n>`` payloads that
a config entry references with ``use_pickle: false`` (so none is ever unpickled), and a program
whose expressions, call targets and pytree specs are in plain allow-lists. Torch-free: it reads
the zip and the JSON only. The single pickle that remains (the sample inputs) is loaded
weights-only by :func:`worker.engine.modelio.check_pt2_archive`.
"""
from __future__ import annotations

import ast
import json
import re
import zipfile

from .errors import InputError

SAMPLE_INPUTS = "data/sample_inputs/model.pt"
PROGRAM = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
# Relative to the archive's root folder; torch.export.save writes all of these (the last two are
# the zip writer's own records).
_REQUIRED = {"archive_format": b"pt2", "archive_version": b"0", PROGRAM: None,
             SAMPLE_INPUTS: None, WEIGHTS_CONFIG: None, CONSTANTS_CONFIG: None}
_OPTIONAL = {"byteorder", ".data/version", ".data/serialization_id"}
# Payload folder -> the file names the saver gives raw tensor bytes in it.
_PAYLOADS = {"data/weights/": re.compile(r"weight_[0-9]{1,7}"),
             "data/constants/": re.compile(r"tensor_[0-9]{1,7}")}
_CONFIGS = {WEIGHTS_CONFIG: "data/weights/", CONSTANTS_CONFIG: "data/constants/"}
# torch names the root folder after the file (any name); only what could be a path is refused.
_ROOT = re.compile(r"(?!\.\.?$)[^/\\\x00-\x1f]{1,200}")

# Call targets a classifier's ATen graph uses (resolved by name with getattr, so anything else
# is refused rather than resolved).
_TARGET = re.compile(
    r"torch\.ops\.(?:aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
    r"|_operator\.(?:getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge"
    r"|and_|or_|not_|invert)"
    r"|torch\.(?:sym_float|sym_int|sym_max|sym_min|sym_not|sym_ite|sym_sum|sym_sqrt|_sym_sqrt)"
    r"|math\.(?:ceil|floor|trunc|sqrt)")
# Pytree node types the program's input/output specs may use: none of them imports anything.
_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
               "torch.fx.immutable_collections.immutable_list",
               "torch.fx.immutable_collections.immutable_dict"}

# sympy.sympify evaluates expr_str as Python with sympy and builtins in scope; what torch writes
# is srepr-like ("Symbol('s31', positive=True, integer=True)", "Mul(Integer(2), ...)").
_SYM_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
    "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "BooleanTrue",
    "BooleanFalse",
    # torch.utils._sympy.functions, as the deserializer passes them to sympify
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity"}
_SYM_CONSTS = {"True", "False", "oo", "zoo", "nan", "true", "false"}
_SYM_VAR = re.compile(r"[a-z]{1,3}[0-9]{1,9}")  # s31, u0, ... (auto-symbols, never builtins)
_SYM_KWARGS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real",
               "finite", "nonzero", "zero", "rational", "commutative"}
_SYM_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SYM_OPS = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp,
            ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div,
            ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.Eq, ast.NotEq,
            ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or)
MAX_EXPR_CHARS = 4000


class _Refused(Exception):
    def __init__(self, member: str, why: str) -> None:
        super().__init__(why)
        self.member, self.why = member, why


def check_layout(zf: zipfile.ZipFile, name: str, hint: str) -> str:
    """Refuse (``unsafe_model``) any archive that is not exactly what ``torch.export.save``
    writes; returns the root folder. ``name`` says which file it is ("model 'm.pt2'")."""
    try:
        return _check(zf)
    except _Refused as e:
        raise InputError(
            "unsafe_model",
            f"{name} is not in the layout torch.export.save writes, so it is not loaded: its "
            f"member '{e.member}' {e.why}",
            "save a plain program of tensors with torch.export.save of torch 2.14 (no custom "
            "objects, no tensor subclasses, no AOTInductor packages, no edits to the archive): "
            + hint) from None


def _check(zf: zipfile.ZipFile) -> str:
    infos = zf.infolist()
    if not infos:
        raise _Refused("(none)", "is missing: the archive is empty")
    # torch's reader (miniz) does not adjust offsets for bytes prepended to a zip, and it finds
    # names case-insensitively and takes the first of duplicates, while Python's zipfile takes
    # the last: any of these would let torch read other bytes than the ones checked here.
    if min(i.header_offset for i in infos) != 0:
        raise _Refused(infos[0].filename, "does not start the file (data before the zip)")
    seen: set[str] = set()
    for i in infos:
        key = i.filename.casefold()
        if key in seen:
            raise _Refused(i.filename, "appears twice (names must be unique, ignoring case)")
        seen.add(key)
    root = infos[0].filename.split("/", 1)[0]
    rel: dict[str, zipfile.ZipInfo] = {}
    for i in infos:
        head, sep, tail = i.filename.partition("/")
        if not sep:
            raise _Refused(i.filename, "is at the top of the zip, outside any root folder (the "
                                       "root-level legacy layout is never read)")
        if head != root or not _ROOT.fullmatch(root):
            raise _Refused(i.filename, f"is outside the archive's root folder '{root[:80]}/'")
        rel[tail] = i
    for r, want in _REQUIRED.items():
        if r not in rel:
            raise _Refused(f"{root}/{r}", "is missing")
        if want is not None and zf.read(rel[r]).strip() != want:
            raise _Refused(f"{root}/{r}", f"does not hold {want.decode()!r}")
    payloads: dict[str, set[str]] = {d: set() for d in _PAYLOADS}
    unknown = []
    for r in rel:
        folder, _, fname = r.rpartition("/")
        if f"{folder}/" in _PAYLOADS and _PAYLOADS[f"{folder}/"].fullmatch(fname):
            payloads[f"{folder}/"].add(fname)
        elif not (r in _REQUIRED or r in _OPTIONAL):
            unknown.append(r)
    # The configs first: a bad entry explains an extra member better than the member does.
    referenced = {folder: _check_config(_json(zf, rel[cfg], f"{root}/{cfg}"), f"{root}/{cfg}",
                                        _PAYLOADS[folder]) for cfg, folder in _CONFIGS.items()}
    for r in unknown:
        raise _Refused(f"{root}/{r}", "is not a member torch.export.save writes (only the "
                                      "program, its configs, raw weight_<n>/tensor_<n> payloads "
                                      "and the sample inputs are accepted)")
    for cfg, folder in _CONFIGS.items():
        for path_name in sorted(referenced[folder] - payloads[folder]):
            raise _Refused(f"{root}/{cfg}", f"references '{path_name}', which is not in the "
                                            "archive")
        for fname in sorted(payloads[folder] - referenced[folder]):
            raise _Refused(f"{root}/{folder}{fname}", "is referenced by no config entry")
    check_program(_json(zf, rel[PROGRAM], f"{root}/{PROGRAM}"), f"{root}/{PROGRAM}")
    return root


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: str):
    try:
        return json.loads(zf.read(info))
    except (ValueError, RecursionError):
        raise _Refused(member, "is not valid JSON") from None


def _check_config(cfg, member: str, payload_name: re.Pattern) -> set[str]:
    """The raw payload files a weights/constants config references. Every entry is raw bytes:
    ``use_pickle`` true (a pickled tensor subclass, an opaque or custom object) is refused, so a
    path_name can never be read both as bytes and as a pickle. Entries may share a path_name:
    the saver does that for tensors that share storage (tied weights)."""
    if not isinstance(cfg, dict) or set(cfg) != {"config"} or not isinstance(cfg["config"], dict):
        raise _Refused(member, 'is not {"config": {...}}')
    referenced = set()
    for fqn, meta in cfg["config"].items():
        where = f"entry {fqn!r}"[:120]
        if not isinstance(meta, dict):
            raise _Refused(member, f"has a malformed {where}")
        path_name = meta.get("path_name")
        if isinstance(path_name, str) and path_name.startswith(("custom_obj_", "opaque_obj_")):
            raise _Refused(member, f"has {where} declaring the object {path_name[:80]!r}: "
                                   "custom and opaque objects are unpickled with code")
        if not isinstance(path_name, str) or not payload_name.fullmatch(path_name):
            raise _Refused(member, f"has {where} with the path_name {str(path_name)[:80]!r} "
                                   f"(expected {payload_name.pattern}: no folders, no '..')")
        if meta.get("use_pickle") is not False:
            raise _Refused(member, f"has {where} with use_pickle {meta.get('use_pickle')!r}: "
                                   "pickled payloads (tensor subclasses, custom or opaque "
                                   "objects) are never unpickled")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise _Refused(member, f"has {where} without tensor metadata")
        _check_sym_fields(meta["tensor_meta"], member)
        referenced.add(path_name)
    return referenced


def check_program(program, member: str) -> None:
    """The parts of ``models/model.json`` that torch turns into code: expressions (sympify),
    call targets (getattr by name), pytree specs (imports) and guards (exec)."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _Refused(member, "is not an exported program")
    if program.get("guards_code"):
        raise _Refused(member, "carries guards code, which would be executed; export without "
                               "input guards")
    _check_sym_fields(program, member)
    for d in _walk_dicts(program):
        # Every graph (the program's and any nested one) lists its nodes under "nodes".
        nodes = d.get("nodes") if isinstance(d.get("nodes"), list) else []
        for node in [d, *nodes] if {"target", "inputs"} <= d.keys() else nodes:
            target = node.get("target") if isinstance(node, dict) else node
            if not isinstance(target, str) or not _TARGET.fullmatch(target):
                raise _Refused(member, f"calls {str(target)[:120]!r}, which is not an ATen "
                                       "operator or one of the few Python operators allowed")
        for key in ("in_spec", "out_spec"):
            if isinstance(d.get(key), str):
                _check_treespec(d[key], member)


def _walk_dicts(obj):
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            yield o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _check_sym_fields(obj, member: str) -> None:
    for d in _walk_dicts(obj):
        if "expr_str" in d:
            why = sym_expr_problem(d["expr_str"])
            if why:
                raise _Refused(member, f"has the symbolic expression {str(d['expr_str'])[:120]!r}"
                                       f", which {why}")


def sym_expr_problem(expr) -> str | None:
    """Why ``expr`` is not a plain sympy expression of shape symbols, or None. Checked with
    Python's parser: only calls of sympy classes by name, numbers, short words as arguments,
    arithmetic and comparisons; no attributes, subscripts, lambdas or other names."""
    if not isinstance(expr, str):
        return "is not a string"
    if len(expr) > MAX_EXPR_CHARS:
        return f"is longer than {MAX_EXPR_CHARS} characters"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not an expression"
    for n in ast.walk(tree):
        if not isinstance(n, _SYM_OPS):
            return f"uses Python syntax that is not arithmetic ({type(n).__name__})"
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name)
                                            and n.func.id in _SYM_CALLS):
            return "calls something that is not a sympy constructor"
        if isinstance(n, ast.Name) and not (n.id in _SYM_CALLS or n.id in _SYM_CONSTS
                                            or _SYM_VAR.fullmatch(n.id)):
            return f"names {n.id!r}, which is not a shape symbol"
        if isinstance(n, ast.keyword) and (n.arg not in _SYM_KWARGS or not (
                isinstance(n.value, ast.Constant) and isinstance(n.value.value, bool))):
            return f"passes the keyword {n.arg!r}"
        if isinstance(n, ast.Constant) and not (
                (isinstance(n.value, (int, float)) and abs(n.value) < 2 ** 63)
                or (isinstance(n.value, str) and _SYM_WORD.fullmatch(n.value))):
            return "holds a constant that is not a (64-bit) number or a symbol name"
    return None


def _check_treespec(spec: str, member: str) -> None:
    """A pytree spec: ``[1, {"type", "context", "children_spec"}]``. Types outside
    ``_SPEC_TYPES`` (defaultdict imports a module it names) and enum contexts (imported by
    name too) are refused."""
    try:
        proto, schema = json.loads(spec)
    except (ValueError, TypeError, RecursionError):
        raise _Refused(member, "has a pytree spec that is not [protocol, {...}]") from None
    stack = [schema]
    while stack:
        s = stack.pop()
        if not isinstance(s, dict) or s.get("type") not in _SPEC_TYPES:
            what = s.get("type") if isinstance(s, dict) else s
            raise _Refused(member, f"has a pytree spec of the type {str(what)[:80]!r}, which is "
                                   "not a tuple, list or dict")
        ctx = s.get("context")
        if isinstance(ctx, str):
            try:
                decoded = json.loads(ctx)
            except (ValueError, RecursionError):
                raise _Refused(member, "has a pytree context that is not JSON") from None
            if any("__enum__" in d for d in _walk_dicts(decoded)):
                raise _Refused(member, "has an enum in a pytree context (enums are imported "
                                       "by name)")
        elif ctx is not None:
            raise _Refused(member, "has a pytree context that is not a string")
        children = s.get("children_spec", [])
        if not isinstance(children, list):
            raise _Refused(member, "has a malformed pytree spec")
        stack.extend(children)
    if proto != 1:
        raise _Refused(member, f"has a pytree spec of the protocol {str(proto)[:20]!r}")
