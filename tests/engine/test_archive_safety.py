"""The zip checks at their exact edges, on archives built in memory: the declared total and the
bytes actually produced may equal the cap but not pass it, the ratio check starts above 1 MiB and
refuses more than the limit, the documented defaults, and configure() applying only what is
given."""
from __future__ import annotations

import io
import zipfile

import pytest

from worker.engine import archive_safety as A
from worker.engine.errors import InputError

MiB = 1 << 20


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> zipfile.ZipFile:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return zipfile.ZipFile(io.BytesIO(buf.getvalue()))


def test_the_documented_defaults():
    assert A.GiB == 2 ** 30 and A.MAX_UNCOMPRESSED_BYTES == 8 * 2 ** 30
    assert A.MAX_RATIO == 200.0 and A.RATIO_MIN_BYTES == MiB


def test_a_declared_total_equal_to_the_cap_passes_and_one_byte_more_does_not():
    zf = _zip({"a": b"x" * 600, "b": b"y" * 400})
    assert A.check_members(zf, "h", max_total=1000) == 1000
    with pytest.raises(InputError) as e:
        A.check_members(zf, "h", max_total=999)
    assert e.value.code == "zip_bomb" and "999" in str(e.value)


def test_an_unsafe_name_gets_the_callers_hint_or_the_default():
    zf = _zip({"../evil": b"x"})
    with pytest.raises(InputError) as e:
        A.check_members(zf, "h")
    assert e.value.code == "unsafe_archive" and "relative paths" in e.value.hint
    with pytest.raises(InputError) as e:
        A.check_members(zf, "h", hint="my hint")
    assert e.value.hint == "my hint"


def test_the_ratio_check_starts_above_1_mib_and_refuses_more_than_the_limit():
    def info(size: int, compressed: int) -> zipfile.ZipInfo:
        i = zipfile.ZipInfo("m")
        i.file_size, i.compress_size = size, compressed
        return i

    A.check_ratio(info(MiB, 1), MiB, "h", 200.0)  # 1 MiB exactly: too small to matter
    A.check_ratio(info(200 * 8192, 8192), 200 * 8192, "h", 200.0)  # exactly the limit
    with pytest.raises(InputError) as e:
        A.check_ratio(info(200 * 8192 + 1, 8192), 200 * 8192 + 1, "h", 200.0)
    assert e.value.code == "zip_bomb" and "expands 200 times" in str(e.value)
    with pytest.raises(InputError):  # a stored size of 0 counts as 1
        A.check_ratio(info(MiB + 1, 0), MiB + 1, "h", 200.0)
    # ... as 1 exactly, not 0 nor 2: a limit just below the size refuses, one twice the size passes
    with pytest.raises(InputError, match="expands 1048577 times"):
        A.check_ratio(info(MiB + 1, 0), MiB + 1, "h", float(MiB))
    A.check_ratio(info(MiB + 1, 0), MiB + 1, "h", float(2 * MiB))


def test_what_decompression_produces_may_reach_the_cap_but_not_pass_it():
    data = bytes(range(256)) * 40  # 10,240 bytes, stored
    zf = _zip({"a": data})
    info = zf.getinfo("a")
    assert A.ReadBudget("h", max_total=len(data)).read_member(zf, info) == data
    with pytest.raises(InputError) as e:
        A.ReadBudget("h", max_total=len(data) - 1).read_member(zf, info)
    assert e.value.code == "zip_bomb"


def test_the_ratio_is_checked_on_the_bytes_produced_while_reading():
    """read_member refuses by itself (not only check_members): the archive's caps are enforced
    on what decompression yields."""
    zf = _zip({"zeros": bytes(3 * MiB)}, zipfile.ZIP_DEFLATED)  # deflates ~1000:1
    info = zf.getinfo("zeros")
    with pytest.raises(InputError) as e:
        A.ReadBudget("h", max_ratio=200.0).read_member(zf, info)
    assert e.value.code == "zip_bomb" and "expands" in str(e.value)
    assert len(A.ReadBudget("h", max_ratio=1e6).read_member(zf, info)) == 3 * MiB


def test_configure_applies_only_what_it_is_given(monkeypatch):
    monkeypatch.setattr(A.CAPS, "max_total", A.MAX_UNCOMPRESSED_BYTES)
    monkeypatch.setattr(A.CAPS, "max_ratio", A.MAX_RATIO)
    A.configure(max_total=123)
    assert A.CAPS.max_total == 123 and A.CAPS.max_ratio == A.MAX_RATIO
    A.configure(max_ratio=7)
    assert A.CAPS.max_total == 123 and A.CAPS.max_ratio == 7.0
    A.configure()
    assert A.CAPS.max_total == 123 and A.CAPS.max_ratio == 7.0


def test_torchscript_is_code_beside_a_data_pickle():
    is_torchscript = A.is_torchscript
    assert is_torchscript(["m/code/__torch__/m.py", "m/data.pkl"])
    assert is_torchscript(["code/__torch__/m.py", "data.pkl"])  # at the archive's root
    assert not is_torchscript(["m/code/__torch__/m.py", "m/constants.pkl"])  # no data.pkl
    assert not is_torchscript(["m/data.pkl", "m/code/other.py"])  # no TorchScript code


def test_the_ratio_is_judged_on_exactly_the_bytes_produced():
    size = MiB + 2  # two reads: the second one passes RATIO_MIN_BYTES
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("m", bytes(size))
    zf = zipfile.ZipFile(buf)
    info = zf.getinfo("m")
    assert len(A.ReadBudget("h", 10 * MiB, 1.0).read_member(zf, info)) == size  # stored: 1.0
    just_below = (size - 1) / size
    assert just_below * size == size - 1  # the limit is size - 1 bytes, exactly
    with pytest.raises(InputError, match="expands"):
        A.ReadBudget("h", 10 * MiB, just_below).read_member(zf, info)
