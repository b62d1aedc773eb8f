"""The engine's JSON parser/writer (qlora_native.io.json_loads/json_dumps) vs Python's json module."""
import json
import math
import struct

import pytest

import qlora_native
from qlora_native.io import json_dumps, json_loads

FormatError = qlora_native.FormatError


def same(a, b):
    """Equality that also checks types (1 vs 1.0 vs True) and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # order too
    return a == b


def random_string(rng):
    n = int(rng.integers(0, 12))
    pools = [(0x20, 0x7F), (0x00, 0x20), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    out = []
    for _ in range(n):
        lo, hi = pools[int(rng.integers(0, len(pools)))]
        out.append(chr(int(rng.integers(lo, hi))))
    return "".join(out) + rng.choice(["", '"', "\\", "/", "\n", "\u2028"])


def random_float(rng):
    while True:
        kind = rng.integers(0, 3)
        if kind == 0:  # any finite double, bit pattern uniform
            f = struct.unpack("<d", rng.bytes(8))[0]
        elif kind == 1:
            f = float(rng.standard_normal() * 10.0 ** int(rng.integers(-30, 30)))
        else:
            f = float(rng.choice([0.0, -0.0, 1.0, 0.1, 1e16, 1e-4, 1e-5, 9999999999999998.0, 5e-324, 1.7976931348623157e308]))
        if math.isfinite(f):
            return f


def random_doc(rng, depth=0):
    kind = int(rng.integers(0, 9 if depth < 5 else 6))
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.integers(-(2**63), 2**63 - 1, endpoint=True)) if rng.random() < 0.5 else int(rng.integers(-1000, 1000))
    if kind == 3:
        return random_float(rng)
    if kind in (4, 5):
        return random_string(rng)
    if kind in (6, 7):
        return {random_string(rng): random_doc(rng, depth + 1) for _ in range(int(rng.integers(0, 6)))}
    return [random_doc(rng, depth + 1) for _ in range(int(rng.integers(0, 6)))]


def test_random_documents_match_python(rng):
    for _ in range(200):
        doc = random_doc(rng)
        for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False), json.dumps(doc, indent=3)):
            assert same(json_loads(text), doc), text
            assert same(json_loads(text.encode()), doc), text
        # Writer: byte-identical to Python's (shortest float repr, escapes, separators, indent).
        assert json_dumps(doc) == json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        assert json_dumps(doc, indent=2) == json.dumps(doc, ensure_ascii=False, indent=2)
        assert json_dumps(doc, indent=0) == json.dumps(doc, ensure_ascii=False, indent=0)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, -3e-7, 1E+2, 0.0, -0, -0.0, 123456789012345678], "b": {"c": null, "d": true, "e": false}}',
        '"\\u00e9\\u4e2d\\ud83d\\ude00\\n\\t\\r\\b\\f\\/\\\\\\""',
        '"é中😀 raw utf-8"',
        '"\\u0000nul inside"',
        " \t\r\n [ ] \n",
        "[[[[[[[[[[]]]]]]]]]]",
        "9223372036854775807",
        "-9223372036854775808",
        "1.7976931348623157e308",
        "5e-324",
        "2.2250738585072014e-308",
        "1e-400",
        "-1e-400",
        "0.1e1",
        '{"":""}',
        '{"a":1,"b":2,"a_":3,"A":4}',
    ],
)
def test_documents_match_python(text):
    assert same(json_loads(text), json.loads(text))


def test_big_integers_become_nearest_double():
    for v in (2**63, -(2**63) - 1, 10**30, -(10**25) + 7):
        got = json_loads(str(v))
        assert type(got) is float and got == float(v)
    assert json_loads("9223372036854775807") == 2**63 - 1  # int64 limits stay exact
    assert type(json_loads("-9223372036854775808")) is int


def test_object_order_and_duplicates():
    assert list(json_loads('{"z":1,"a":2,"m":3}')) == ["z", "a", "m"]
    with pytest.raises(FormatError, match='duplicate object key "a"'):
        json_loads('{"a":1,"b":{},"a":2}')
    text = '{"a":1,"b":2,"a":3}'
    assert same(json_loads(text, allow_duplicate_keys=True), {"a": 3, "b": 2})
    assert json.loads(text) == {"a": 3, "b": 2}


# Invalid for both us and Python's json.
INVALID = [
    "", " ", "{", "}", "[1,]", "[1 2]", '{"a" 1}', '{"a":1,}', "{1:2}", "{'a':1}", "[01]", "[1.]", "[.5]",
    "[1e]", "[1e+]", "[-]", "[+1]", "tru", "nul", "True", '"abc', '"\\x"', '"\\u12"', '"\\u12g4"', '"a\nb"',
    '"tab\there"', '"\x01"', "[1] x", "{} {}", "[", "[[]", '{"a":[}', "0x10", "--1", "1 2", "[1,,2]",
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_documents(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(FormatError, match=r"line \d+, column \d+ \(byte \d+\)"):
        json_loads(text)


# Stricter than Python's json (which accepts these as extensions).
@pytest.mark.parametrize(
    "text",
    ["NaN", "[Infinity]", "-Infinity", '"\\ud800"', '"\\udc00x"', '"\\ud800\\u0041"', "1e400", "-1e999", "\ufeff{}"],
)
def test_rejected_extensions(text):
    with pytest.raises(FormatError):
        json_loads(text)


@pytest.mark.parametrize(
    "raw",
    [b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b"[\x80]", b'"\xe0\x80\xaf"'],
)
def test_invalid_utf8(raw):
    with pytest.raises(FormatError):
        json_loads(raw)
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


def test_error_positions():
    text = '{\n  "a": 1,\n  "b": x}'
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    e = ref.value
    with pytest.raises(FormatError, match=rf"line {e.lineno}, column {e.colno} \(byte {e.pos}\)"):
        json_loads(text)
    with pytest.raises(FormatError, match=r"trailing"):
        json_loads("[1]\n]")


def test_depth_limit():
    ok = "[" * 512 + "]" * 512
    assert json_loads(ok) is not None
    with pytest.raises(FormatError, match="nesting deeper than 512"):
        json_loads("[" * 513 + "]" * 513)
    with pytest.raises(FormatError, match="nesting"):
        json_loads('{"a":' * 200000 + "1" + "}" * 200000)  # no stack overflow
    assert json_loads("[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(FormatError):
        json_loads("[[[1]]]", max_depth=2)


def test_dumps_errors():
    for bad in (float("nan"), [float("inf")], {"a": -float("inf")}):
        with pytest.raises(ValueError, match="NaN or infinity"):
            json_dumps(bad)
    with pytest.raises(ValueError, match="keys must be str"):
        json_dumps({1: 2})
    with pytest.raises(ValueError, match="int64"):
        json_dumps(2**64)
    with pytest.raises(ValueError, match="cannot encode"):
        json_dumps({1, 2})
    cyc = []
    cyc.append(cyc)
    with pytest.raises(ValueError, match="circular"):
        json_dumps(cyc)


def test_dumps_roundtrip_types():
    doc = {"i": 1, "f": 1.0, "neg0": -0.0, "big": 1e300, "small": 1e-300, "t": (1, "x"), "s": "\x00\x1f\u2028"}
    back = json_loads(json_dumps(doc))
    assert same(back, {**doc, "t": [1, "x"]})
    assert json_dumps(1.0) == "1.0" and json_dumps(1e16) == "1e+16" and json_dumps(123.456) == "123.456"


def test_cpp_accessors():
    """json::Value::get_or / at / as_* as the config loaders use them (through a test hook)."""
    acc = qlora_native._core.io._json_access
    cfg = '{"hidden_size": 576, "rope_theta": 10000.0, "tie": true, "act": "silu", "eps": 1e-5, "n": null, "k": 1e3, "arr": [4, 5]}'
    assert acc(cfg, "hidden_size", "int", 0) == 576
    assert acc(cfg, "missing", "int", 7) == 7
    assert acc(cfg, "n", "int", 8) == 8  # null means absent
    assert acc(cfg, "k", "int", 0) == 1000  # integral double accepted as int
    assert acc(cfg, "rope_theta", "double", 0.0) == 10000.0
    assert acc(cfg, "hidden_size", "double", 0.0) == 576.0
    assert acc(cfg, "tie", "bool", False) is True
    assert acc(cfg, "act", "string", "gelu") == "silu"
    assert acc(cfg, "eps", "at_double", None) == 1e-5
    assert acc(cfg, "arr", "size", None) == 2
    assert acc('[3, 9]', "1", "index", None) == 9
    with pytest.raises(FormatError, match="JSON key 'act': expected integer, got string"):
        acc(cfg, "act", "int", 0)
    with pytest.raises(FormatError, match="non-integral"):
        acc(cfg, "eps", "at_int", None)
    with pytest.raises(FormatError, match="expected bool, got integer"):
        acc(cfg, "hidden_size", "at_bool", None)
    with pytest.raises(FormatError, match="no key 'vocab_size'"):
        acc(cfg, "vocab_size", "at_int", None)
    with pytest.raises(FormatError, match="index 2 out of range"):
        acc('[3, 9]', "2", "index", None)
    with pytest.raises(FormatError, match="expected object, got array"):
        acc('[1]', "a", "int", 0)


def test_python_str_with_lone_surrogate():
    # A Python str that is not valid Unicode text cannot become UTF-8 (UnicodeEncodeError is a ValueError).
    with pytest.raises(ValueError):
        json_loads('"\ud800"')
    with pytest.raises(ValueError):
        json_dumps({"k": "\udfff"})


def test_json_load_file(tmp_path, rng):
    from qlora_native.io import json_load

    doc = random_doc(rng)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    assert same(json_load(p), doc)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,}')
    with pytest.raises(FormatError, match="bad.json: invalid JSON at line 1"):
        json_load(bad)
    with pytest.raises(FileNotFoundError):
        json_load(tmp_path / "missing.json")
