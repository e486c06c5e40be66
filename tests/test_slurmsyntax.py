"""Slurm's syntax (``ledger.slurmsyntax``) against the rules of Slurm's own source, tag
slurm-22-05-8-1: src/common/hostlist.c (hostlists), src/common/parse_time.c time_str2secs /
time_str2mins (time limits), src/common/gres.c (GRES requests, gres.conf),
src/common/slurm_opt.c (--gpus, --array). Generated input (hypothesis) against a naive
model of each rule."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import slurmsyntax as ss

prefixes = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True).filter(
    lambda p: not p[-1].isdigit())
ranges = st.tuples(st.integers(0, 300), st.integers(0, 12), st.integers(0, 3))


def _range_text(lo: int, span: int, pad: int) -> tuple[str, list[str]]:
    width = len(str(lo + span)) + pad if pad else 0
    names = [f"{n:0{width}d}" for n in range(lo, lo + span + 1)]
    text = f"{lo:0{width}d}" + (f"-{lo + span:0{width}d}" if span else "")
    return text, names


@given(prefixes, st.lists(ranges, min_size=1, max_size=4), st.text("-x", max_size=2))
def test_hostlist_is_the_cartesian_product_and_keeps_padding(prefix, rs, suffix):
    """hostlist.c: ``prefix[a-b,c]suffix`` is every number of every range, zero-padded to the
    width of a padded low end, in order."""
    parts = [_range_text(*r) for r in rs]
    text = f"{prefix}[{','.join(t for t, _ in parts)}]{suffix}"
    expected = [f"{prefix}{n}{suffix}" for _, names in parts for n in names]
    assert ss.expand_hostlist(text) == expected


@given(prefixes, ranges, ranges)
def test_two_brackets_expand_left_to_right(prefix, a, b):
    (ta, na), (tb, nb) = _range_text(*a), _range_text(*b)
    got = ss.expand_hostlist(f"{prefix}[{ta}]-n[{tb}]")
    assert got == [f"{prefix}{x}-n{y}" for x, y in itertools.product(na, nb)]
    assert len(set(got)) == len(got)


@given(st.lists(prefixes, min_size=1, max_size=5, unique=True))
def test_plain_names_are_kept_in_order(names):
    assert ss.expand_hostlist(",".join(names)) == names


def test_hostlist_bounds_and_refusals():
    with pytest.raises(ss.TooLarge):
        ss.expand_hostlist(f"n[0-{ss.MAX_HOSTS}]")  # MAX_RANGE + 1 names
    assert len(ss.expand_hostlist(f"n[1-{ss.MAX_HOSTS}]")) == ss.MAX_HOSTS
    for bad in ("n[1-", "n[3-1]", "n[a-b]", "n]1[", "n[1-2]-[a,b]"):
        with pytest.raises(ss.SlurmSyntaxError):
            ss.expand_hostlist(bad)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=6))
def test_index_lists_within_the_bound(items):
    text = ",".join(f"{lo}-{lo + n}" if n else str(lo) for lo, n in items)
    expected = [i for lo, n in items for i in range(lo, lo + n + 1)]
    assert ss.expand_indices(text, limit=10_000) == expected


def test_index_lists_over_the_bound_are_refused_before_they_are_built():
    with pytest.raises(ss.TooLarge):
        ss.expand_indices("0-999999999999")
    with pytest.raises(ss.SlurmSyntaxError):
        ss.expand_indices("0-x")


# -- time limits: parse_time.c time_str2secs / time_str2mins -------------------------------

N = st.integers(0, 99)
H, M, S = st.integers(0, 23), st.integers(0, 59), st.integers(0, 59)
DURATIONS = st.one_of(
    N.map(lambda m: (f"{m}", m * 60)),                                        # MM
    st.tuples(N, S).map(lambda t: (f"{t[0]}:{t[1]:02d}", t[0] * 60 + t[1])),  # MM:SS
    st.tuples(H, M, S).map(lambda t: (f"{t[0]}:{t[1]:02d}:{t[2]:02d}",
                                      t[0] * 3600 + t[1] * 60 + t[2])),      # HH:MM:SS
    st.tuples(N, H).map(lambda t: (f"{t[0]}-{t[1]}", t[0] * 86400 + t[1] * 3600)),  # D-HH
    st.tuples(N, H, M).map(lambda t: (f"{t[0]}-{t[1]}:{t[2]:02d}",
                                      t[0] * 86400 + t[1] * 3600 + t[2] * 60)),  # D-HH:MM
    st.tuples(N, H, M, S).map(lambda t: (f"{t[0]}-{t[1]:02d}:{t[2]:02d}:{t[3]:02d}",
                                         t[0] * 86400 + t[1] * 3600 + t[2] * 60 + t[3])),
)


@given(DURATIONS)
def test_every_form_of_time_str2mins(case):
    text, seconds = case
    assert ss.time_str2secs(text) == seconds
    assert ss.time_str2mins(text) == (seconds + 59) // 60  # rounded up, as Slurm keeps it
    if seconds:
        assert ss.time_limit_seconds(text) == (seconds + 59) // 60 * 60


def test_time_limits_by_example():
    assert ss.time_str2secs("90") == 5400  # minutes, not seconds
    assert ss.time_limit_seconds("1:30") == 120  # 90 s: Slurm gives the job 2 minutes
    assert ss.time_str2secs("2-") == 2 * 86400
    for unlimited in ("UNLIMITED", "infinite", "-1"):
        assert ss.time_str2secs(unlimited) is None
    for bad in ("", "1:", ":30", "1-2-3", "1:2:3:4", "1h", "1-:30", "-5", "1:2-3"):
        with pytest.raises(ss.SlurmSyntaxError):
            ss.time_str2secs(bad)
    for no_bound in ("0", "UNLIMITED"):
        with pytest.raises(ss.SlurmSyntaxError):
            ss.time_limit_seconds(no_bound)


# -- GRES and TRES strings -------------------------------------------------------------------

TYPES = st.from_regex(r"[A-Za-z][A-Za-z0-9_.]{0,7}|[1-7]g\.[0-9]{1,2}gb", fullmatch=True)


@given(st.sampled_from(["", "gres:", "gres/"]), st.sampled_from(["gpu", "shard", "mps"]),
       st.none() | TYPES, st.none() | st.integers(1, 64))
def test_gres_items_parse_to_their_count_and_type(prefix, name, gtype, count):
    """gres.c: ``name[:type][:count]``; a missing count is 1; types compared without case."""
    text = prefix + name + (f":{gtype}" if gtype else "") + (f":{count}" if count else "")
    assert ss.parse_gres(text) == (count or 1, gtype.lower() if gtype else None, name)


@given(TYPES, st.integers(1, 8), st.integers(1, 8))
def test_gres_types_match_without_case(gtype, a, b):
    both = f"gres:gpu:{gtype.upper()}:{a},gres/gpu:{gtype.lower()}:{b}"
    assert ss.parse_gres(both) == (a + b, gtype.lower(), "gpu")


def test_gres_refusals():
    with pytest.raises(ss.SlurmSyntaxError, match="unknown GRES"):
        ss.parse_gres("gpunic:1")
    assert ss.parse_gres("gpu:2,nic:1", known=("nic",)) == (2, None, "gpu")
    with pytest.raises(ss.SlurmSyntaxError, match="not both"):
        ss.parse_gres("gpu:1,shard:1")
    with pytest.raises(ss.SlurmSyntaxError, match="one GPU type"):
        ss.parse_gres("gpu:h100:1,gpu:a100:1")


@given(st.none() | TYPES, st.integers(1, 64))
def test_gpus_option(gtype, count):
    text = f"{gtype}:{count}" if gtype else str(count)
    assert ss.parse_gpus(text) == (count, gtype.lower() if gtype else None)


@given(st.dictionaries(TYPES.map(str.lower), st.integers(1, 16), max_size=3),
       st.integers(0, 4), st.sampled_from(["gres/", "gres:"]))
def test_tres_gpu_counts(typed, untyped, sep):
    items = ["cpu=4", "node=1"] + [f"{sep}gpu:{t}={n}" for t, n in typed.items()]
    total = sum(typed.values()) + untyped
    if total:
        items.append(f"{sep}gpu={total}")
    expected = dict(typed)
    if untyped:
        expected[None] = untyped
    assert ss.gpus_in_tres(",".join(items)) == expected


def test_gres_detail_indices():
    assert ss.gres_indices("gpu:H100:1(IDX:0),gpu:a100:1(IDX:2)") == {0: "h100", 2: "a100"}
    assert ss.gres_indices("gpu:2(IDX:0-1)") == {0: None, 1: None}


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 50), st.integers(1, 5)),
                min_size=1, max_size=4), st.none() | st.integers(1, 9))
def test_array_size(items, limit):
    spec = ",".join(f"{lo}-{lo + n}:{step}" if n else str(lo) for lo, n, step in items)
    expected = sum(len(range(lo, lo + n + 1, step if n else 1)) for lo, n, step in items)
    assert ss.array_size(spec + (f"%{limit}" if limit else "")) == expected


# -- gres.conf --------------------------------------------------------------------------------


def test_gres_conf_lines():
    text = """
    # comment
    NodeName=n[1-2] Name=gpu Type=H100 File=/dev/nvidia[0-1]
    NodeName=n1 Name=gpu Type=1g.10gb MultipleFiles=/dev/nvidia2,/dev/nvidia-caps/cap[21-22]
    Name=gpu Type=a100 Count=2
    NodeName=n1 Name=shard Count=8 File=/dev/nvidia0
    AutoDetect=nvml
    """
    lines = ss.gres_conf(text)
    assert [(x.name, x.gpu_type, x.count) for x in lines] == [
        ("gpu", "h100", None), ("gpu", "1g.10gb", None), ("gpu", "a100", 2), ("shard", None, 8)]
    assert ss.node_gpus(lines, "n1") == [
        ("h100", ("/dev/nvidia0",)), ("h100", ("/dev/nvidia1",)),
        ("1g.10gb", ("/dev/nvidia2", "/dev/nvidia-caps/cap21", "/dev/nvidia-caps/cap22")),
        ("a100", ()), ("a100", ())]
    assert [t for t, _ in ss.node_gpus(lines, "n2")] == ["h100", "h100", "a100", "a100"]


def test_the_module_is_standard_library_only():
    """The controller hooks import it: nothing beyond the standard library and ledger."""
    code = ("import sys; before = set(sys.modules); import ledger.slurmsyntax; "
            "print('\\n'.join(sorted(m.split('.')[0] for m in set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = {m for m in out.stdout.split()
              if m not in sys.stdlib_module_names and m != "ledger" and not m.startswith("_")}
    assert loaded == set()
