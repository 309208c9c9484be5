"""Hub sources through a local ``huggingface_hub`` cache: offline, or online against a stand-in Hub
on 127.0.0.1 (never the network)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.reliability_helpers import HANG_S, Rig, assert_unchanged, snapshot, within

hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "lorahot-test/tiny-adapter"


def _peft_tensors(rank: int) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.proj.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.proj.lora_B.weight": torch.randn(6, rank),
    }


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache holding ``REPO`` at ``main``: a PEFT adapter at the root, a kohya file in
    ``kohya/`` (whose config, PEFT's and diffusers' weight files the cache records as missing);
    the process is offline."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (snap / "kohya").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file(_peft_tensors(4), snap / "adapter_model.safetensors")
    (snap / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2}')
    save_file(
        {
            "lora_unet_proj.lora_down.weight": torch.randn(2, 8),
            "lora_unet_proj.lora_up.weight": torch.randn(6, 2),
            "lora_unet_proj.alpha": torch.tensor(1.0),
        },
        snap / "kohya" / "style.safetensors",
    )
    # the kohya folder has no config, nor PEFT's or diffusers' weights: recorded as a read online records them
    (repo / ".no_exist" / COMMIT / "kohya").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        (repo / ".no_exist" / COMMIT / "kohya" / name).touch()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_reads_the_snapshot(hub_cache: Path) -> None:
    adapter = lorahot.read_adapter(REPO)
    assert adapter.format == "peft"
    assert adapter.modules["proj"].scale == 2 / 4
    assert adapter.source == f"{REPO}/adapter_model.safetensors"


def test_subfolder_and_weight_name(hub_cache: Path) -> None:
    by_folder = lorahot.read_adapter(REPO, subfolder="kohya")
    by_name = lorahot.read_adapter(REPO, subfolder="kohya", weight_name="style.safetensors", revision="main")
    for adapter in (by_folder, by_name):
        assert adapter.format == "kohya" and adapter.modules["lora_unet_proj"].scale == 0.5


def test_runtime_loads_a_repo_id(hub_cache: Path) -> None:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    assert runtime.load(REPO, subfolder="kohya").ranks == {"proj": 2}


def test_missing_file_offline_names_the_repo(hub_cache: Path) -> None:
    with pytest.raises(
        lorahot.SourceNotFoundError, match=rf"{REPO}: cannot get missing\.safetensors from the Hub .*HF_HUB_OFFLINE=1"
    ):
        lorahot.read_adapter(REPO, weight_name="missing.safetensors")
    with pytest.raises(lorahot.SourceNotFoundError, match=r"lorahot-test/absent: cannot get the adapter from the Hub"):
        lorahot.read_adapter("lorahot-test/absent")


@pytest.mark.parametrize("repo", ["a/b/c", "org/na me", "-bad/name", "org/..", "org/name."])
def test_malformed_repo_ids_are_refused(hub_cache: Path, repo: str) -> None:
    with pytest.raises(lorahot.SourceNotFoundError, match=r"neither an existing path nor a valid Hub repo id"):
        lorahot.read_adapter(repo)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subfolder": "../x"},
        {"subfolder": "/etc"},
        {"weight_name": "a/../../b.safetensors"},
        {"weight_name": "a\\b.safetensors"},
    ],
)
def test_path_traversal_is_refused(hub_cache: Path, kwargs: dict[str, str]) -> None:
    with pytest.raises(
        lorahot.SourceNotFoundError, match=r"(must stay inside the adapter directory or repo|relative path with '/')"
    ):
        lorahot.read_adapter(REPO, **kwargs)


def _failing_config(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """hf_hub_download works for weights (from the cache) and raises ``error`` for the config."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def download(repo_id: str, filename: str, **kwargs: object) -> str:
        if filename == "adapter_config.json":
            raise error
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_config_fetch_failure_is_an_error_not_alpha_equals_rank(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network failure used to load the adapter at alpha = rank, silently."""
    _failing_config(monkeypatch, ConnectionError("connection reset by peer"))
    with pytest.raises(
        lorahot.SourceNotFoundError,
        match=rf"{REPO}: cannot fetch adapter_config\.json from the Hub \(ConnectionError: connection reset by peer\)"
        r".*The Hub could not be reached: check the network.*Or pass config=",
    ):
        lorahot.read_adapter(REPO, weight_name="adapter_model.safetensors")
    given = lorahot.read_adapter(REPO, weight_name="adapter_model.safetensors", config={"r": 4, "lora_alpha": 8})
    assert given.modules["proj"].scale == 2.0


def _configless_folder(hub_cache: Path) -> None:
    """``other/w.safetensors`` in the cache, and nothing known about ``other/adapter_config.json``."""
    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snap / "other").mkdir()
    save_file(_peft_tensors(4), snap / "other" / "w.safetensors")


def test_the_hub_saying_not_found_means_no_config(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import EntryNotFoundError

    _configless_folder(hub_cache)
    _failing_config(monkeypatch, EntryNotFoundError("404: adapter_config.json"))
    assert lorahot.read_adapter(REPO, subfolder="other", weight_name="w.safetensors").modules["proj"].scale == 1.0


def test_offline_without_a_cached_answer_is_an_error(hub_cache: Path) -> None:
    """Offline, a config neither cached nor recorded missing (.no_exist) is unknown, not absent; the
    error names what hf_hub_download's "not in the local cache" relays: offline mode."""
    _configless_folder(hub_cache)
    with pytest.raises(
        lorahot.SourceNotFoundError,
        match=rf"{REPO}: cannot fetch other/adapter_config\.json from the Hub \(OfflineModeIsEnabled: .*HF_HUB_OFFLINE",
    ):
        lorahot.read_adapter(REPO, subfolder="other", weight_name="w.safetensors")
    assert lorahot.read_adapter(REPO, subfolder="kohya", weight_name="style.safetensors").format == "kohya"  # .no_exist


@pytest.mark.parametrize(
    "revision",
    ["../../outside", "main/../../x", "/etc", "refs/./main", "a\\b", "main\n", "main\x00", "refs//main", "..", "x/"],
)
def test_a_revision_that_could_leave_the_cache_is_refused_before_any_request(
    hub_cache: Path, tmp_path: Path, revision: str
) -> None:
    """huggingface_hub joins the revision onto paths in its cache: with '..' in it an
    independent audit read a file outside the cache offline (a planted ref) and wrote one
    outside it online. Refused before the Hub is asked, naming the argument."""
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(_peft_tensors(4), outside / "adapter_model.safetensors")
    ref = hub_cache / f"models--{REPO.replace('/', '--')}" / "refs" / "evil"
    ref.write_text("../../../outside")  # a planted ref, as the audit's read went through
    with pytest.raises(lorahot.UsageError, match=r"must be a branch, tag or commit name.*no '\.\.'"):
        lorahot.read_adapter(REPO, revision=revision)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", COMMIT])
def test_branch_tag_pr_and_commit_revisions_pass_the_check(hub_cache: Path, revision: str) -> None:
    try:
        lorahot.read_adapter(REPO, revision=revision)
    except lorahot.SourceNotFoundError:
        pass  # not in this cache: the Hub's answer, after the check
    except lorahot.UsageError as exc:
        pytest.fail(f"{revision!r} refused: {exc}")


@pytest.mark.parametrize("weight_name", ["adapter_model.bin", "model.PT", "sub/x.ckpt"])
def test_a_pickle_weight_name_is_refused_before_it_is_downloaded(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, weight_name: str
) -> None:
    from lorahot.io import hub

    def no_request(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was asked for a pickle")

    monkeypatch.setattr(hub, "_download", no_request)
    with pytest.raises(lorahot.AdapterReadError, match=r"pickles, and lorahot never unpickles \(nor downloads them\)"):
        lorahot.read_adapter(REPO, weight_name=weight_name)


def test_a_preloaded_repo_id_is_read_again_once_its_branch_moves_in_the_local_cache(hub_cache: Path) -> None:
    """The host cache keyed a Hub id by its name and revision only, so after ``main`` moved to a
    new commit (another download rewrote the cache's ref) ``load(id)`` kept serving the
    preloaded adapter, 28 off the new one (an independent audit; ``read_adapter`` already read
    the new commit). The key now holds the ref's stat; a commit hash needs none."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    runtime.preload(REPO)
    repo = hub_cache / f"models--{REPO.replace('/', '--')}"
    new = "f" * 40
    (repo / "snapshots" / new).mkdir()
    torch.manual_seed(7)
    tensors = _peft_tensors(4)
    save_file(tensors, repo / "snapshots" / new / "adapter_model.safetensors")
    (repo / "snapshots" / new / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2}')
    (repo / "refs" / "main").write_text(new)
    runtime.load(REPO)
    x = torch.randn(3, 8)
    a, b = tensors["base_model.model.proj.lora_A.weight"], tensors["base_model.model.proj.lora_B.weight"]
    want = model.proj.base_layer(x) + 0.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(model(x), want)


def test_a_weight_name_in_a_folder_reads_the_config_beside_it(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``weight_name="a/w.safetensors"``: the config fetched is ``a/adapter_config.json``, the
    one the read then consults, not the repo root's (before, the root's was fetched and the
    folder's read: alpha silently the rank where the folder's was not cached)."""
    import huggingface_hub

    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snap / "a").mkdir()
    save_file(_peft_tensors(4), snap / "a" / "w.safetensors")
    (snap / "a" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 1}')
    asked: list[tuple[str, str | None]] = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id: str, filename: str, *, subfolder: str | None = None, **kwargs: object) -> str:
        asked.append((filename, subfolder))
        return real(repo_id, filename, subfolder=subfolder, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    adapter = lorahot.read_adapter(REPO, weight_name="a/w.safetensors")
    assert ("adapter_config.json", "a") in asked and ("adapter_config.json", None) not in asked
    assert adapter.modules["proj"].scale == 1 / 4
    assert adapter.source == f"{REPO}/a/w.safetensors"


def test_a_snapshot_brings_only_top_level_files(online_hub: StandInHub) -> None:
    """A whole repo brings only what the read opens: the top-level safetensors files and the
    config of the folder read, never a checkpoint folder below it or a pickle."""
    online_hub.serve(
        {
            "adapter_model.safetensors": _peft_bytes(4),
            "adapter_config.json": b'{"r": 4, "lora_alpha": 2}',
            "step-100/adapter_model.safetensors": _peft_bytes(4),
            "base/x.safetensors": _peft_bytes(4),
            "adapter_model.bin": b"a pickle",
            "README.md": b"# adapter",
        }
    )
    assert lorahot.read_adapter(REPO).modules["proj"].scale == 2 / 4
    assert online_hub.fetched() == ["adapter_config.json", "adapter_model.safetensors"]  # the config first


@pytest.mark.parametrize("name", ["model.gguf", "weights.onnx", "adapter.npz", "README.md"])
def test_a_weight_name_that_is_no_safetensors_file_is_refused_before_any_request(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a request was made"))
    with pytest.raises(lorahot.UsageError, match=r"is not a \.safetensors file"):
        lorahot.read_adapter(REPO, weight_name=name)


def test_a_path_object_never_names_a_repo(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Path("org/name")`` with no such local folder is a missing path, not the Hub repo of
    that spelling (a mistyped local path would otherwise read a stranger's repo)."""
    monkeypatch.chdir(tmp_path)
    assert lorahot.read_adapter(REPO).format == "peft"  # the string: the repo
    with pytest.raises(lorahot.SourceNotFoundError, match=r"no such file or directory"):
        lorahot.read_adapter(Path(REPO))


def test_hub_options_with_a_local_path_are_refused(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local folder spelled like a repo id takes the read; a revision or token given with it
    means the caller may have meant the repo, so it is refused, not dropped. A weight_name with
    a file source is refused too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    save_file(_peft_tensors(2), tmp_path / REPO / "adapter_model.safetensors")
    assert lorahot.read_adapter(REPO).modules["proj"].rank == 2  # the local folder, as documented
    for kwargs in ({"revision": "main"}, {"token": "hf_x"}):
        with pytest.raises(lorahot.UsageError, match=r"is a local path, so (revision|token)= \(Hub options\) cannot"):
            lorahot.read_adapter(REPO, **kwargs)
    with pytest.raises(lorahot.UsageError, match=r"is a file, so weight_name='y\.safetensors'"):
        lorahot.read_adapter(tmp_path / REPO / "adapter_model.safetensors", weight_name="y.safetensors")


def test_hub_options_with_a_local_path_are_refused_before_its_header_is_judged(tmp_path: Path) -> None:
    """The refusal comes first, whatever the file holds: a local adapter that cannot fit the
    runtime's model (a load or preload plans its fit from the header before reading data), or
    whose keys cannot form an adapter, was refused for that, the Hub option left unmentioned."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 5))  # the file's B has 6 rows
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    save_file(_peft_tensors(2), tmp_path / "adapter_model.safetensors")
    lone_a = tmp_path / "lone"
    lone_a.mkdir()
    save_file({"base_model.model.proj.lora_A.weight": torch.randn(2, 8)}, lone_a / "adapter_model.safetensors")
    calls = (runtime.load, runtime.preload, lorahot.read_adapter)
    for call, source in [*((c, tmp_path) for c in calls), *((c, lone_a) for c in calls)]:
        for kwargs in ({"revision": "main"}, {"token": "hf_x"}):
            with pytest.raises(lorahot.UsageError, match=r"is a local path, so (revision|token)= \(Hub options\)"):
                call(str(source), **kwargs)
    assert runtime.info() is None and len(runtime.cache) == 0


def _response(status: int) -> SimpleNamespace:
    """What huggingface_hub's HTTP errors read off a response."""
    return SimpleNamespace(status_code=status, headers={}, request=None)


def _http(cls_name: str, status: int) -> Callable[[], Exception]:
    def make() -> Exception:
        from huggingface_hub import utils

        return getattr(utils, cls_name)(
            f"{status} Client Error for url: https://huggingface.co/x", response=_response(status)
        )

    return make


def _plain(cls_name: str, text: str) -> Callable[[], Exception]:
    def make() -> Exception:
        from huggingface_hub import utils

        return getattr(utils, cls_name)(text)

    return make


def _client_timeout() -> Exception:
    from huggingface_hub.utils import _http as hub_http

    client = pytest.importorskip(next(m for m in ("httpx2", "httpx", "requests") if hasattr(hub_http, m)))
    return client.ReadTimeout("timed out")  # type: ignore[no-any-return]


def _connect_error() -> Exception:
    from huggingface_hub.utils import _http as hub_http

    client = pytest.importorskip(next(m for m in ("httpx2", "httpx", "requests") if hasattr(hub_http, m)))
    return client.ConnectError("[Errno 111] Connection refused")  # type: ignore[no-any-return]


def _relayed(make: Callable[[], Exception]) -> Callable[[], Exception]:
    """``make()``'s failure as hf_hub_download relays a failed metadata request for a file it has not
    cached: its "not in the local cache" raised over it."""

    def relay() -> Exception:
        from huggingface_hub.utils import LocalEntryNotFoundError

        exc = LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot find the requested files in "
            "the local cache. Please check your connection and try again or make sure your Internet connection is on."
        )
        exc.__cause__ = make()
        return exc

    return relay


_LOG_IN = r"gated or private, or the token was refused: log in \(hf auth login\) or pass token="
_ONLINE_ONCE = r"not in the local Hugging Face cache.*fetch it once while online"
_UNREACHABLE = r"The Hub could not be reached: check the network"
_TIMED_OUT = (
    r"The Hub could not be reached: no answer within \d+ s to a request \(HF_HUB_ETAG_TIMEOUT\) or \d+ s to a read "
    r"of a download \(HF_HUB_DOWNLOAD_TIMEOUT\): check the network .* or raise those timeouts"
)

#: huggingface_hub's failures, each as a factory, and the fix the error must name for it
HUB_FAILURES = {
    "gated": (_http("GatedRepoError", 403), _LOG_IN),
    "unauthorized": (_http("HfHubHTTPError", 401), _LOG_IN),
    "forbidden": (_http("HfHubHTTPError", 403), _LOG_IN),
    "private or missing, as a 401": (_http("RepositoryNotFoundError", 401), _LOG_IN),
    "no token": (_plain("LocalTokenNotFoundError", "Token is required (`token=True`)"), _LOG_IN),
    "no such repo": (_http("RepositoryNotFoundError", 404), r"No such repo on the Hub.*check the repo id"),
    "no such revision": (_http("RevisionNotFoundError", 404), r"No such revision in the repo: check revision="),
    "no such file": (_plain("EntryNotFoundError", "404 entry"), r"The repo has no such file: check weight_name="),
    "not cached": (_plain("LocalEntryNotFoundError", "Cannot find the requested files"), _ONLINE_ONCE),
    "offline": (_plain("OfflineModeIsEnabled", "offline"), _ONLINE_ONCE),
    "rate limited": (_http("HfHubHTTPError", 429), r"limiting the rate of requests: wait and retry"),
    "server error": (_http("HfHubHTTPError", 500), r"server error\): retry later"),
    "bad gateway": (_http("HfHubHTTPError", 502), r"server error\): retry later"),
    "timeout": (lambda: TimeoutError("timed out"), _TIMED_OUT),
    "connection reset": (lambda: ConnectionResetError(104, "Connection reset by peer"), _UNREACHABLE),
    "http client timeout": (_client_timeout, _TIMED_OUT),
    "disk full": (lambda: OSError(28, "No space left on device"), r"cache \(HF_HUB_CACHE\) cannot be read or written"),
    "another answer": (_http("HfHubHTTPError", 400), r"The Hub refused the request \(HTTP 400\): check the repo id"),
    # hf_hub_download's "not in the local cache", raised over the failure of a file's metadata request
    "forbidden, relayed": (_relayed(_http("HfHubHTTPError", 403)), _LOG_IN),
    "rate limited, relayed": (_relayed(_http("HfHubHTTPError", 429)), r"limiting the rate of requests: wait and retry"),
    "server error, relayed": (_relayed(_http("HfHubHTTPError", 500)), r"server error\): retry later"),
    "no connection, relayed": (_relayed(_connect_error), _UNREACHABLE),
    "client timeout, relayed": (_relayed(_client_timeout), _TIMED_OUT),
    "no metadata, relayed": (
        _relayed(_plain("FileMetadataError", "Distant resource does not seem to be on huggingface.co.")),
        r"The Hub's answer lacked the file's metadata \(its ETag or commit\): a proxy or mirror \(HF_ENDPOINT\)",
    ),
    "offline, relayed": (_relayed(_plain("OfflineModeIsEnabled", "offline")), _ONLINE_ONCE),
    "anything else, relayed": (_relayed(lambda: ValueError("unforeseen")), _ONLINE_ONCE),
    "anything else": (lambda: ValueError("unforeseen"), r"Check the repo id, revision and file names"),
}


def _rig(hub_cache: Path) -> Rig:
    """A runtime with the cache's kohya adapter in slot 0: what a failed load must leave alone."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
    runtime.load(REPO, subfolder="kohya")
    return Rig(model, runtime, torch.randn(2, 8))


def _refused_everywhere(
    rig: Rig, capsys: pytest.CaptureFixture[str], error: type[Exception], message: str, **kwargs: str
) -> None:
    """``read_adapter``, ``load`` (into either slot), ``preload``, ``prefetch`` (its future) and
    ``lorahot inspect`` all refuse the source with ``error`` matching ``message``, in bounded time;
    the runtime is bitwise unchanged."""
    from lorahot import cli

    before = snapshot(rig)
    calls = [
        lorahot.read_adapter,
        lambda *a, **k: rig.runtime.load(*a, **k, slot=0),
        lambda *a, **k: rig.runtime.load(*a, **k, slot=1),
        rig.runtime.preload,
        lambda *a, **k: rig.runtime.prefetch(*a, **k).result(),
    ]
    for call in calls:
        with pytest.raises(error, match=message):
            within(HANG_S, lambda: call(REPO, **kwargs))  # noqa: B023 - run before the next iteration
        assert_unchanged(rig, before)
    capsys.readouterr()
    options = [part for name, value in kwargs.items() for part in (f"--{name.replace('_', '-')}", value)]
    with pytest.raises(SystemExit) as exited:
        cli.main(["inspect", REPO, *options])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lorahot: error: ") and re.search(message, last.removeprefix("lorahot: error: ")), last


@pytest.mark.parametrize("where", ["snapshot", "file", "config"])
@pytest.mark.parametrize("failure", list(HUB_FAILURES))
def test_a_hub_failure_is_refused_naming_the_repo_and_the_fix_for_its_cause(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failure: str, where: str
) -> None:
    """Every failure of huggingface_hub is a SourceNotFoundError naming the repo and what to do
    about its cause; it said 'check the repo id, revision and file names' whatever the cause (a
    gated repo, a rate limit, a full disk). A failure hf_hub_download relays as "not in the local
    cache" (a 403, a rate limit, a server error, no connection, an answer without the file's
    metadata) was told to go online: it is named and fixed as the failure beneath; another answer
    of the Hub (a 400) was told the cache's disk cannot be written."""
    import huggingface_hub

    make, fix = HUB_FAILURES[failure]
    rig = _rig(hub_cache)
    exc = make()
    real = huggingface_hub.hf_hub_download

    def fail(*args: object, **kwargs: object) -> str:
        filename = kwargs.get("filename", args[1] if len(args) > 1 else None)
        if where == "config" and filename != "adapter_config.json":
            return real(*args, **kwargs)  # type: ignore[arg-type]
        raise exc

    if where == "snapshot":  # the repo's listing fails, and the cache holds nothing for main to fall back on
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", fail)
        (hub_cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").unlink()
    else:
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    kwargs = {} if where == "snapshot" else {"weight_name": "adapter_model.safetensors"}
    what = {
        "snapshot": "get the adapter",
        "file": "get adapter_model.safetensors",
        "config": "fetch adapter_config.json",
    }
    named = exc.__cause__ if failure.endswith(", relayed") and "anything else" not in failure else exc
    message = rf"^{REPO}: cannot {what[where]} from the Hub \({type(named).__name__}: .*\)[.,] .*{fix}"
    if where == "config" and failure == "no such file":
        pytest.skip("the Hub's own 'no such file' means no config (test_the_hub_saying_not_found_means_no_config)")
    _refused_everywhere(rig, capsys, lorahot.SourceNotFoundError, message, **kwargs)


class StandInHub(ThreadingHTTPServer):
    """A Hub on 127.0.0.1 that huggingface_hub is pointed at: it lists ``REPO`` at ``COMMIT``
    with the files :meth:`serve` gives and serves them (a repo's info, a file's metadata and
    bytes) but those ``gone``, or, stalled, accepts every connection and never answers. The
    requests for a file of ``stalling`` are accepted and not answered until ``release``; those
    of ``slow`` get their bytes in pieces, that many seconds apart; those of ``limited`` a rate
    limit's 429, to be retried in an hour; those of ``refused`` a 403 (a token refused for it); those of
    ``answers`` (a file's name, or the path of the repo's listing) that status and those headers, no body;
    a request at a commit of ``older``, that commit's files."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.files: dict[str, bytes] = {}
        self.gone: set[str] = set()  # listed, answered 'no such file'
        self.sha: object = COMMIT  # the commit its listing names
        self.stalled = False
        self.stalling: set[str] = set()
        self.slow: dict[str, float] = {}
        self.limited: set[str] = set()  # answered 429, retry after an hour
        self.refused: set[str] = set()  # answered 403
        self.answers: dict[str, tuple[int, dict[str, str]]] = {}
        self.older: dict[str, dict[str, bytes]] = {}  # commit -> its files, for a request at that commit
        self.requests: list[str] = []
        self.release = threading.Event()  # lets stalled requests end (a stalled file's, answered), at teardown
        self.held = threading.Event()  # set once a request for a file of ``stalling`` waits for ``release``
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def serve(self, files: dict[str, bytes]) -> None:
        self.files.update(files)

    def fetched(self) -> list[str]:
        """The repo's files downloaded (GET of a file, in order)."""
        prefix = f"GET /{REPO}/resolve/{COMMIT}/"
        return [unquote(r[len(prefix) :]) for r in self.requests if r.startswith(prefix)]


class _StandInHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub, path = self.server, unquote(urlsplit(self.path).path)
        hub.requests.append(f"{self.command} {path}")
        if hub.stalled:
            hub.release.wait()  # the connection is accepted; no byte of an answer ever comes
            return
        at = re.fullmatch(rf"/{REPO}/resolve/([0-9a-f]{{40}})/(.+)", path)
        if at is not None and at[1] in hub.older:  # a file of an older commit, asked for at that commit
            files, headers = hub.older[at[1]], {"X-Repo-Commit": at[1]}
            if at[2] in files:
                data = files[at[2]]
                self._send(200, data, {**headers, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
            else:
                self._send(404, b"", {**headers, "X-Error-Code": "EntryNotFound"}, body)
            return
        name = re.sub(rf"^/{REPO}/resolve/(main|{COMMIT})/", "", path)
        if name in hub.stalling:
            hub.held.set()
            hub.release.wait()
        if name in hub.answers:
            status, headers = hub.answers[name]
            self._send(status, b"", headers, body)
        elif path in (f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}"):  # repo_info, diffusers' model_info
            info = {"id": REPO, "sha": hub.sha, "siblings": [{"rfilename": p} for p in hub.files]}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        elif name in hub.limited:
            self._send(429, b"", {"Retry-After": "3600"}, body)
        elif name in hub.refused:
            self._send(403, b"", {}, body)
        elif name in hub.files and name not in hub.gone:
            data = hub.files[name]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            self._send(200, data, headers, body, hub.slow.get(name, 0.0))
        else:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, gap: float = 0.0) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body and gap:  # eight pieces, ``gap`` seconds apart
            for start in range(0, len(data), -(-len(data) // 8)):
                self.wfile.write(data[start : start + -(-len(data) // 8)])
                self.wfile.flush()
                time.sleep(gap)
        elif body:
            self.wfile.write(data)


@pytest.fixture
def stand_in_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """huggingface_hub online, every request of it sent to a :class:`StandInHub`."""
    hub = StandInHub()
    # polled every 20 ms for its shutdown (the default 0.5 s held each test's teardown that long)
    thread = threading.Thread(target=hub.serve_forever, args=(0.02,), daemon=True, name="lorahot-test-hub")
    thread.start()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)  # read by HfApi() when it is made
    monkeypatch.setattr(
        hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    yield hub
    hub.release.set()
    hub.shutdown()
    hub.server_close()


@pytest.fixture
def online_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in_hub: StandInHub) -> StandInHub:
    """An empty cache, and huggingface_hub online against a stand-in Hub (serving nothing yet)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return stand_in_hub


#: LORAHOT_HUB_TIMEOUT and HF_HUB_ETAG_TIMEOUT where a test waits them out: the stand-in Hub on
#: 127.0.0.1 answers what it answers within milliseconds, so half a second still tells an answer
#: from a stall on a loaded machine, and each refusal waits half as long as under 1 s
WAIT_S = 0.5


def _local_rig(tmp_path: Path) -> Rig:
    """A runtime with a local adapter file in slot 0: what a failed Hub load must leave alone."""
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
    save_file(_peft_tensors(2), tmp_path / "adapter_model.safetensors")
    runtime.load(str(tmp_path / "adapter_model.safetensors"))
    return Rig(model, runtime, torch.randn(2, 8))


def _peft_bytes(rank: int, seed: int = 0) -> bytes:
    from safetensors.torch import save

    torch.manual_seed(seed)
    return save(_peft_tensors(rank))


@pytest.mark.parametrize(
    "files, subfolder, error, message",
    [
        (
            ["adapter_model.bin", "README.md"],
            None,
            lorahot.AdapterReadError,
            r"the repo's top level holds only pickle checkpoints \(adapter_model\.bin\), no \.safetensors file; "
            r"lorahot never unpickles",
        ),
        (
            ["x/adapter_model.pt"],
            "x",
            lorahot.AdapterReadError,
            r"folder 'x' of the repo holds only pickle checkpoints",
        ),
        (
            ["checkpoint-500/adapter_model.safetensors", "README.md"],
            None,
            lorahot.SourceNotFoundError,
            r"no \.safetensors file at the repo's top level; the repo has checkpoint-500/adapter_model\.safetensors\. "
            r"Pass subfolder= or weight_name=",
        ),
        (
            ["adapter_model.safetensors"],
            "nope",
            lorahot.SourceNotFoundError,
            r"no \.safetensors file at folder 'nope' of the repo; the repo has adapter_model\.safetensors",
        ),
        (["README.md", "model.gguf"], None, lorahot.SourceNotFoundError, r"the repo holds no \.safetensors file"),
    ],
)
def test_a_repo_without_safetensors_where_the_read_looks_says_what_it_holds(
    online_hub: StandInHub,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    files: list[str],
    subfolder: str | None,
    error: type[Exception],
    message: str,
) -> None:
    """Online, a snapshot whose patterns match nothing downloads nothing, and the read used to
    say '<cache>/snapshots/<commit>: no such file or directory. Check subfolder= and the path'
    for a repo of pickles (an older PEFT adapter_model.bin), a repo whose safetensors files lie
    in folders, or a wrong subfolder: a path the caller never gave, no repo named, the wrong
    fix. It now names the repo and says what it holds there, from the Hub's listing, and
    downloads nothing."""
    online_hub.serve(dict.fromkeys(files, b""))
    kwargs = {"subfolder": subfolder} if subfolder else {}
    _refused_everywhere(_local_rig(tmp_path), capsys, error, rf"^{REPO}: {message}", **kwargs)
    assert online_hub.fetched() == []


def test_a_hub_that_never_answers_is_refused_within_its_timeout(
    online_hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole repo was listed by requests with no timeout at all (huggingface_hub's
    snapshot_download): an endpoint that accepts the connection and never answers (a stalled
    proxy or mirror) held ``load("org/name")`` until the connection dropped (400 s in an
    independent audit). The listing is now one request bounded by HF_HUB_ETAG_TIMEOUT, and the
    load is refused naming the repo and the timeout, with nothing changed."""
    monkeypatch.setattr(hub_constants, "HF_HUB_ETAG_TIMEOUT", WAIT_S)
    online_hub.stalled = True
    started = time.monotonic()
    _refused_everywhere(
        _local_rig(tmp_path),
        capsys,
        lorahot.SourceNotFoundError,
        rf"^{REPO}: cannot get the adapter from the Hub \(ReadTimeout: .*\)\. The Hub could not be reached: no answer "
        rf"within {re.escape(str(WAIT_S))} s to a request \(HF_HUB_ETAG_TIMEOUT\)",
    )
    assert time.monotonic() - started < 6 * (WAIT_S + 1) + 0.5  # six refusals, each within about its WAIT_S
    assert online_hub.requests and all(r == f"GET /api/models/{REPO}/revision/main" for r in online_hub.requests)


def test_a_hub_that_never_answers_leaves_the_cached_snapshot_to_load(
    hub_cache: Path, stand_in_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As snapshot_download did on a connection error or timeout, the cache serves what it
    holds: online, a stalled Hub costs one bounded request, not the load."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_ETAG_TIMEOUT", WAIT_S)
    stand_in_hub.stalled = True
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert adapter.format == "peft" and adapter.modules["proj"].scale == 2 / 4
    assert stand_in_hub.requests == [f"GET /api/models/{REPO}/revision/main"]


def _abandoned_fetches_end() -> None:
    """Waits for the fetches a deadline gave up on (their worker threads) to end."""
    for thread in threading.enumerate():
        if thread.name == "lorahot-hub-fetch":
            thread.join(HANG_S)
            assert not thread.is_alive(), "an abandoned Hub fetch is still running"


#: what a fetch the deadline gave up on says: the limit, the variable setting it and the fixes
_STALLED = (
    rf"\(HubTimeout: nothing from the Hub within {re.escape(f'{WAIT_S:g}')} s \(LORAHOT_HUB_TIMEOUT\)\)[.,] .*The Hub "
    r"did not serve the request "
    r"in time \(a stalled connection, or a failure huggingface_hub kept retrying: no connection, a server error, a "
    r"rate limit\), and the local cache holds no copy: check the network \(a proxy, HF_ENDPOINT\) and retry later, "
    r"or raise LORAHOT_HUB_TIMEOUT \(30 s unless set\) for a slow Hub; a copy in the local cache loads with "
    r"HF_HUB_OFFLINE=1\."
)


@pytest.mark.parametrize(
    "stalling, kwargs, what",
    [
        ("adapter_model.safetensors", {}, "get the adapter"),
        ("adapter_model.safetensors", {"weight_name": "adapter_model.safetensors"}, "get adapter_model.safetensors"),
        ("adapter_config.json", {"weight_name": "adapter_model.safetensors"}, "fetch adapter_config.json"),
    ],
    ids=["repo", "file", "file's config"],
)
def test_a_hub_that_stalls_on_a_file_is_refused_within_lorahot_hub_timeout(
    online_hub: StandInHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stalling: str,
    kwargs: dict[str, str],
    what: str,
) -> None:
    """A Hub that answers the listing and then never answers a file's request held a load for
    about 6.5 minutes: hf_hub_download makes a timed-out metadata request of a file not cached
    again (60 s a try, 5 retries with backoff). A fetch now waits at most LORAHOT_HUB_TIMEOUT
    for the Hub; then it is refused naming the limit and the fix, with nothing changed."""
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", str(WAIT_S))
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.stalling.add(stalling)
    rig = _local_rig(tmp_path)
    started = time.monotonic()
    _refused_everywhere(
        rig, capsys, lorahot.SourceNotFoundError, rf"^{REPO}: cannot {what} from the Hub {_STALLED}", **kwargs
    )
    assert time.monotonic() - started < 6 * (WAIT_S + 0.5)  # six refusals, each within its WAIT_S and a little
    online_hub.release.set()  # the stalled requests are answered: the abandoned fetches end
    _abandoned_fetches_end()
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    if not kwargs:  # the branch's ref names no snapshot the load did not get, now or later
        assert not (repo / "refs" / "main").exists()


@pytest.mark.parametrize("given_up", ["timed out", "interrupted"])
def test_a_fetch_given_up_on_writes_no_ref_and_no_record_once_its_download_ends(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch, given_up: str
) -> None:
    """The fetch's worker writes the records of the files the listing lacks and the branch's ref
    last, only if the caller is still waiting (``_Watch.last``: under the lock the caller gives it
    up with, after a check of the abandonment). Here the Hub holds the request for the weights
    until the caller has given up (LORAHOT_HUB_TIMEOUT, or a KeyboardInterrupt while it waits),
    then answers it: the worker downloads them whole and stops, leaving no ref and no record (the
    listing lacks diffusers' name) in the cache. Nothing caught a worker that wrote them anyway."""
    from lorahot.io import hub_watch

    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.stalling.add("adapter_model.safetensors")
    if given_up == "timed out":
        monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", str(WAIT_S))
        expected: type[BaseException] = lorahot.SourceNotFoundError
    else:  # the caller, polling its worker, is interrupted once the Hub holds the worker's request
        downloads = hub_watch._Watch._downloads

        def interrupted(self: object) -> dict[str, tuple[int, int]]:
            if online_hub.held.is_set():
                raise KeyboardInterrupt
            return downloads(self)  # type: ignore[arg-type]

        monkeypatch.setattr(hub_watch._Watch, "_downloads", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert online_hub.held.is_set()  # the caller gave up while the Hub held the request
    online_hub.release.set()  # the worker goes on: the weights are downloaded after the caller has gone
    _abandoned_fetches_end()
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    weights = repo / "snapshots" / COMMIT / "adapter_model.safetensors"
    assert online_hub.fetched() == ["adapter_config.json", "adapter_model.safetensors"] and weights.is_file()
    assert not (repo / "refs").exists() and not (repo / ".no_exist").exists()


def test_a_fetch_given_up_on_while_it_writes_its_ref_ends_the_write_first(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gives its worker up (LORAHOT_HUB_TIMEOUT) while the worker writes the branch's
    ref (held here for 2.5 times the limit): it waits for that write under the lock of ``_Watch.last``, then
    reads the snapshot the cache now holds whole. A caller that did not wait was refused ("not
    cached") and the ref appeared after the load had gone."""
    from lorahot.io import hub

    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", str(WAIT_S))
    record_ref = hub._record_ref

    def held(*args: str) -> None:
        time.sleep(2.5 * WAIT_S)  # past the caller's limit
        record_ref(*args)

    monkeypatch.setattr(hub, "_record_ref", held)
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert adapter.modules["proj"].scale == 2.0
    _abandoned_fetches_end()
    ref = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    assert ref.read_text() == COMMIT


def test_a_rate_limit_retried_after_an_hour_is_refused_within_lorahot_hub_timeout(
    online_hub: StandInHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_hub_download retries a file's 429 after its Retry-After, however long: an hour here."""
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", str(WAIT_S))
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.limited.add("adapter_model.safetensors")
    rig = _local_rig(tmp_path)
    before = snapshot(rig)
    started = time.monotonic()
    with pytest.raises(lorahot.SourceNotFoundError, match=rf"^{REPO}: cannot get the adapter from the Hub {_STALLED}"):
        within(HANG_S, lambda: rig.runtime.load(REPO, slot=1))
    assert time.monotonic() - started < WAIT_S + 0.5
    assert_unchanged(rig, before)


def test_a_stalled_hub_leaves_the_cached_file_to_load_within_lorahot_hub_timeout(
    hub_cache: Path, stand_in_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single file the cache holds is read once the Hub has not answered within
    LORAHOT_HUB_TIMEOUT, as huggingface_hub reads it after its own request timed out."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", str(WAIT_S))
    stand_in_hub.stalled = True
    started = time.monotonic()
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO, weight_name="adapter_model.safetensors"))
    assert time.monotonic() - started < WAIT_S + 0.5
    assert adapter.format == "peft" and adapter.modules["proj"].scale == 2 / 4


#: a commit of REPO older than COMMIT, whose snapshot the cache holds
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.mark.parametrize("status", [500, 429, 403])
@pytest.mark.parametrize("config", [b'{"r": 4, "lora_alpha": 2}', None], ids=["its config", "no config"])
def test_a_weight_file_served_from_the_cache_reads_the_config_of_its_own_commit(
    online_hub: StandInHub, status: int, config: bytes | None
) -> None:
    """A file whose request fails (a server error, a rate limit, a refusal) is served by
    hf_hub_download from the snapshot its branch named when last fetched (OLDER here, the
    weights alone). The config read beside it is OLDER's, fetched at that commit: asked for at
    the branch, it came from the newer COMMIT into another snapshot, and the weights were read
    without one, at alpha = rank (scale 1.0 where OLDER's config says 0.5)."""
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    (repo / "snapshots" / OLDER).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(OLDER)
    torch.manual_seed(3)
    weights = _peft_tensors(4)
    save_file(weights, repo / "snapshots" / OLDER / "adapter_model.safetensors")
    online_hub.older[OLDER] = {"adapter_config.json": config} if config is not None else {}
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.answers["adapter_model.safetensors"] = (status, {})
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO, weight_name="adapter_model.safetensors"))
    assert adapter.modules["proj"].scale == (0.5 if config is not None else 1.0)
    for factor in ("A", "B"):  # OLDER's weights, bitwise
        read = getattr(adapter.modules["proj"], factor)
        torch.testing.assert_close(read, weights[f"base_model.model.proj.lora_{factor}.weight"], rtol=0, atol=0)
    if config is None:  # the Hub's "no such file" at OLDER, recorded as huggingface_hub records it
        assert (repo / ".no_exist" / OLDER / "adapter_config.json").is_file()


def test_a_slow_download_is_not_cut_off_by_lorahot_hub_timeout(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LORAHOT_HUB_TIMEOUT bounds the waits for the Hub's answers, not the transfer of a file's
    bytes: a download still receiving them after the limit runs to its end."""
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", "1")
    data = _peft_bytes(4)
    online_hub.serve({"adapter_model.safetensors": data, "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.slow["adapter_model.safetensors"] = 0.4  # eight pieces, at least 2.4 s before the last
    started = time.monotonic()
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert time.monotonic() - started > 2 * 1  # twice the limit
    assert adapter.modules["proj"].scale == 2.0
    path = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (path / "adapter_model.safetensors").read_bytes() == data


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1s", "1e300", f"{threading.TIMEOUT_MAX * 2:.0f}"])
def test_a_bad_lorahot_hub_timeout_is_refused_before_any_request(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """A finite but huge value (above ``threading.TIMEOUT_MAX``, about 292 years) is refused as
    ``inf`` is: a wait of the caller's threads bounded by it raises OverflowError."""
    rig = _rig(hub_cache)
    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", value)
    _refused_everywhere(
        rig,
        capsys,
        lorahot.UsageError,
        rf"^LORAHOT_HUB_TIMEOUT='{re.escape(value)}' must be a number of seconds > 0 and at most "
        rf"{threading.TIMEOUT_MAX:.0f} \(threading\.TIMEOUT_MAX\): the longest a Hub fetch waits for the Hub \(30 "
        r"unless set\)\. Set it to one, or unset it\.",
    )


def test_the_largest_lorahot_hub_timeout_bounds_a_thread_wait_and_a_fetch(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The largest value taken is one a wait of a thread takes, and a fetch online under it
    loads (the watch never times out, nothing overflows)."""
    from lorahot.io import hub

    monkeypatch.setenv("LORAHOT_HUB_TIMEOUT", repr(threading.TIMEOUT_MAX))
    assert hub.hub_timeout() == threading.TIMEOUT_MAX
    lock = threading.Lock()
    assert lock.acquire(timeout=hub.hub_timeout())
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert adapter.modules["proj"].scale == 2.0


def test_a_repo_fetched_online_loads_offline_without_a_revision(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are fetched at the listed commit, which writes no ref; the branch's ref is
    written after them, so an offline read of the branch finds the snapshot. A second online
    read with the branch unmoved leaves the ref as it was (the host cache keys a branch by it)."""
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online = lorahot.read_adapter(REPO)
    ref = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    assert ref.read_text() == COMMIT
    stat = ref.stat()
    lorahot.read_adapter(REPO)
    assert (ref.stat().st_mtime_ns, ref.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    assert online_hub.fetched() == ["adapter_config.json", "adapter_model.safetensors"]  # once each
    online_hub.stalled = True  # offline must not ask
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    offline = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert offline.modules["proj"].scale == online.modules["proj"].scale == 2.0
    for name, module in online.modules.items():
        torch.testing.assert_close(offline.modules[name].A, module.A, rtol=0, atol=0)
        torch.testing.assert_close(offline.modules[name].B, module.B, rtol=0, atol=0)


def test_an_interrupted_fetch_leaves_no_ref_to_a_snapshot_without_its_weights(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config comes first and the ref last: a fetch that fails on the weights leaves the
    branch unresolved in the cache, so offline the read says 'not cached' instead of reading a
    partial snapshot."""
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.gone.add("adapter_model.safetensors")  # listed, but not there when asked for
    with pytest.raises(lorahot.SourceNotFoundError, match=rf"^{REPO}: cannot get the adapter from the Hub"):
        lorahot.read_adapter(REPO)
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    assert not (repo / "refs" / "main").exists()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(lorahot.SourceNotFoundError, match=r"not in the local Hugging Face cache"):
        lorahot.read_adapter(REPO)


@pytest.mark.parametrize("sha", ["../../../outside", None, "0" * 39])
def test_a_listing_that_names_no_commit_is_refused_before_any_download(
    online_hub: StandInHub, tmp_path: Path, sha: object
) -> None:
    """The commit names a folder of the cache: a listing whose commit is not a full hash is
    refused, nothing fetched and nothing written."""
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4)})
    online_hub.sha = sha
    with pytest.raises(lorahot.SourceNotFoundError, match=rf"^{REPO}: .*names no commit of the repo"):
        lorahot.read_adapter(REPO)
    assert online_hub.fetched() == [] and list((tmp_path / "hub").iterdir()) == []


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_cached_file_whose_blob_is_gone_is_refused_with_the_fix_to_fetch_it_again(
    hub_cache: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Offline, a whole repo whose snapshot links a file the read opens to a blob no longer in the
    cache (a cleaned cache, an interrupted copy) was refused as '<cache path>: no such file or
    directory. Check the path.' (the weights) or 'is a dangling symlink. Fix or delete it.'
    (an AdapterReadError, the config): it is refused as a read of that file alone is, naming the
    repo, the file and the fix (fetch it again online), nothing changed."""
    rig = _rig(hub_cache)
    link = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / name
    link.unlink()
    link.symlink_to(f"../../blobs/{'0' * 64}")  # as huggingface_hub links a file to its blob
    message = (
        rf"^{REPO}: the local Hugging Face cache links {re.escape(name)} to a blob it no longer holds "
        r"\(\.\./\.\./blobs/0+\)\. Fetch the repo again while online: huggingface_hub then downloads it again\."
    )
    _refused_everywhere(rig, capsys, lorahot.SourceNotFoundError, message)


def test_a_snapshot_cached_without_its_weights_names_the_repo(
    hub_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, a cached snapshot missing its weight file (an interrupted download) was reported
    as '<cache path>: no adapter weights found'; it now names the repo and says to fetch it."""
    rig = _rig(hub_cache)
    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snap / "adapter_model.safetensors").unlink()
    _refused_everywhere(
        rig,
        capsys,
        lorahot.SourceNotFoundError,
        rf"^{REPO}: the local Hugging Face cache holds no \.safetensors file at the repo's top level.*fetch it once "
        "while online",
    )


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("adapter_model.safetensors", b"\x08" + bytes(20), r"^{where}: .*adapter_model\.safetensors: "),
        ("adapter_config.json", b"{", r"^{where}: .*adapter_config\.json: the adapter config is not valid JSON"),
        (
            "adapter_config.json",
            b'{"r": 4, "lora_alpha": NaN}',
            r"^{where}/adapter_config\.json: invalid adapter config: lora_alpha must be a finite number, got nan",
        ),
    ],
)
def test_a_bad_file_of_a_repo_names_the_repo_and_revision(
    hub_cache: Path, capsys: pytest.CaptureFixture[str], name: str, text: bytes, message: str
) -> None:
    """A damaged or hostile file read from the cache's copy of a repo was named by its cache path
    alone (or, for a config's values, only that path): the repo and the revision asked for were
    not said. The message now starts with them."""
    rig = _rig(hub_cache)
    (hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / name).write_bytes(text)
    _refused_everywhere(
        rig, capsys, lorahot.AdapterReadError, message.format(where=re.escape(f"{REPO}@main")), revision="main"
    )


def _weights_without_config(hub_cache: Path) -> Path:
    """The cache's snapshot of ``REPO`` with its weights but no config, and no record of one:
    what a fetch of the weight file alone leaves (hf_hub_download, or diffusers' load_lora_weights
    with weight_name=)."""
    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snap / "adapter_config.json").unlink()
    return snap


@pytest.mark.parametrize("hub", ["offline", "stalled", "refused"])
def test_a_cached_repo_whose_config_was_never_fetched_is_refused_not_read_at_alpha_equals_rank(
    hub_cache: Path,
    stand_in_hub: StandInHub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    hub: str,
) -> None:
    """A whole repo served by the cache alone (offline, the Hub not answering, or refusing the
    listing) was read without its config where the cache held the weights alone, so the adapter
    computed at alpha = rank (scale 1.0 where the repo's config says 0.5), silently; a single file
    (weight_name=) was refused there. It is now refused the same way, naming the repo, the config
    and the fix, the runtime bitwise unchanged; the cache's record that the repo has no config
    (.no_exist, or its cached file listing without one) and config= let it load."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub == "offline")
    monkeypatch.setattr(hub_constants, "HF_HUB_ETAG_TIMEOUT", WAIT_S)
    stand_in_hub.stalled = hub == "stalled"
    if hub == "refused":  # a server error answers the listing
        monkeypatch.setattr(_StandInHandler, "_answer", lambda self, body: self._send(500, b"", {}, body))
    rig = _rig(hub_cache)
    _weights_without_config(hub_cache)
    cause = {"offline": "OfflineModeIsEnabled", "stalled": r"\w*Timeout\w*", "refused": "HfHubHTTPError"}[hub]
    _refused_everywhere(
        rig,
        capsys,
        lorahot.SourceNotFoundError,
        rf"^{REPO}: cannot fetch adapter_config\.json from the Hub \({cause}: .*\), and without it the adapter's scale "
        r"is unknown: the local Hugging Face cache holds the weights, but neither the config nor a record that the "
        r"repo has none\. .*Or pass config=",
    )
    given = within(HANG_S, lambda: lorahot.read_adapter(REPO, config={"r": 4, "lora_alpha": 2}))
    assert given.modules["proj"].scale == 0.5


def test_a_cached_record_that_the_repo_has_no_config_reads_it_without_one(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache says the repo has no config: the Hub's 'no such file' recorded in .no_exist, or
    a cached file listing of the commit without it (snapshot_download's); not where the listing has one."""
    import huggingface_hub

    _weights_without_config(hub_cache)
    marker = hub_cache / f"models--{REPO.replace('/', '--')}" / ".no_exist" / COMMIT / "adapter_config.json"
    marker.touch()
    assert lorahot.read_adapter(REPO).modules["proj"].scale == 1.0
    marker.unlink()
    for listing, loads in (
        (["adapter_model.safetensors"], True),
        (["adapter_model.safetensors", "adapter_config.json"], False),
    ):
        tree = [SimpleNamespace(path=p) for p in listing]
        monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", lambda *a, tree=tree, **k: tree)
        if loads:
            assert lorahot.read_adapter(REPO).modules["proj"].scale == 1.0
        else:
            with pytest.raises(lorahot.SourceNotFoundError, match=r"neither the config nor a record"):
                lorahot.read_adapter(REPO)


def test_a_repo_fetched_online_without_a_config_loads_offline_without_one(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, the listing shows the repo has no config: the cache records it (.no_exist, as
    huggingface_hub records the Hub's 'no such file'), so an offline read of the snapshot knows
    it has none instead of refusing."""
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4)})
    assert lorahot.read_adapter(REPO).modules["proj"].scale == 1.0
    online_hub.stalled = True  # offline must not ask
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert within(HANG_S, lambda: lorahot.read_adapter(REPO)).modules["proj"].scale == 1.0
    assert online_hub.fetched() == ["adapter_model.safetensors"]


@pytest.mark.parametrize(
    "extra, picked",
    [
        ({"style-v2.safetensors": 3, "optimizer.safetensors": 5}, "adapter_model.safetensors"),
        ({"style-v2.safetensors": 3, "sub/adapter_model.safetensors": 5}, "adapter_model.safetensors"),
    ],
)
def test_a_repo_read_whole_downloads_only_the_file_it_reads(
    online_hub: StandInHub, extra: dict[str, int], picked: str
) -> None:
    """A whole repo fetched every top-level .safetensors file, then read one: a repo holding
    several variants beside adapter_model.safetensors cost all of them (GBs for a collection),
    with the Hub's wait bounded per file. Only the file the read picks is fetched now, and the
    config."""
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.serve({name: _peft_bytes(rank) for name, rank in extra.items()})
    adapter = within(HANG_S, lambda: lorahot.read_adapter(REPO))
    assert adapter.modules["proj"].rank == 4 and adapter.modules["proj"].scale == 2.0
    assert online_hub.fetched() == ["adapter_config.json", picked]


@pytest.mark.parametrize(
    "files, subfolder, message",
    [
        (
            ["a.safetensors", "b.safetensors", "adapter_config.json"],
            None,
            r"the repo's top level: several \.safetensors files \(a\.safetensors, b\.safetensors\); pass weight_name=",
        ),
        (
            ["x/adapter_model.safetensors", "x/pytorch_lora_weights.safetensors", "x/adapter_config.json"],
            "x",
            r"folder 'x' of the repo: both adapter_model\.safetensors \(PEFT's PeftModel\.from_pretrained reads it\) "
            r"and pytorch_lora_weights\.safetensors \(diffusers' load_lora_weights reads it\) are there, maybe two "
            r"adapters; pass weight_name=",
        ),
    ],
    ids=["several", "peft and diffusers"],
)
def test_a_repo_with_several_files_to_pick_from_is_refused_before_any_download(
    online_hub: StandInHub,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    files: list[str],
    subfolder: str | None,
    message: str,
) -> None:
    """Such a repo was downloaded whole before the read refused it (several files), or read as
    PEFT's file where diffusers reads its own (both names). Both are refused from the listing
    now, naming the repo and the files, nothing downloaded and the runtime bitwise unchanged;
    weight_name= picks one."""
    online_hub.serve(
        {name: _peft_bytes(2) if name.endswith(".safetensors") else b'{"r": 2, "lora_alpha": 2}' for name in files}
    )
    kwargs = {"subfolder": subfolder} if subfolder else {}
    _refused_everywhere(_local_rig(tmp_path), capsys, lorahot.SourceNotFoundError, rf"^{REPO}: {message}", **kwargs)
    assert online_hub.fetched() == []
    name = PurePosixPath(files[1]).name
    assert lorahot.read_adapter(REPO, weight_name=name, **kwargs).modules["proj"].scale == 1.0


def _diffusers_reads(
    hub: StandInHub, monkeypatch: pytest.MonkeyPatch, subfolder: str | None = None
) -> dict[str, torch.Tensor]:
    """What diffusers' load_lora_weights reads of ``REPO`` without weight_name= (its own _fetch_state_dict)."""
    import huggingface_hub.hf_api
    from diffusers.loaders.lora_base import _fetch_state_dict

    # diffusers lists through huggingface_hub's module-level HfApi, whose endpoint was read at import
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    state, _ = _fetch_state_dict(REPO, None, True, False, None, False, None, None, None, subfolder, None, False)
    return state


@pytest.mark.parametrize(
    "files, subfolder, mine, theirs",
    [
        (
            ["adapter_model.safetensors", "sub/pytorch_lora_weights.safetensors"],
            None,
            "adapter_model.safetensors",
            "sub/pytorch_lora_weights.safetensors",
        ),
        (
            ["style.safetensors", "x/pytorch_lora_weights.safetensors"],
            None,
            "style.safetensors",
            "x/pytorch_lora_weights",
        ),
        (["adapter-v2.safetensors", "adapter_model.safetensors"], None, "adapter_model.safetensors", "adapter-v2"),
        (["b.safetensors", "sub/adapter_model.safetensors", "sub/b.safetensors"], "sub", "sub/adapter_model", "sub/b"),
    ],
    ids=["diffusers' name in a folder", "beside the only file", "first listed", "above the subfolder"],
)
def test_a_repo_where_diffusers_reads_another_file_is_refused_before_any_download(
    online_hub: StandInHub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    files: list[str],
    subfolder: str | None,
    mine: str,
    theirs: str,
) -> None:
    """diffusers' load_lora_weights guesses from every file of the repo, in the listing's order
    (a name ending in pytorch_lora_weights.safetensors in any folder, else the first), and fetches
    its guess under subfolder=, so it read one file where lorahot read another (PEFT's
    adapter_model.safetensors, or the level's only file): another adapter, silently. Such a repo
    is now refused from the listing, naming both files, nothing downloaded, the runtime bitwise
    unchanged; diffusers' own loader is the oracle of its pick, and weight_name= reads either."""
    online_hub.serve({name: _peft_bytes(2 + (name.startswith(theirs))) for name in files})
    online_hub.serve({"adapter_config.json": b'{"r": 2, "lora_alpha": 2}'})
    kwargs = {"subfolder": subfolder} if subfolder else {}
    message = (
        rf"^{REPO}: this read opens {re.escape(mine)}[\w.]*, but diffusers' load_lora_weights opens "
        rf"{re.escape(theirs)}[\w.]* there \(its _best_guess_weight_name: .*pass weight_name="
    )
    _refused_everywhere(_local_rig(tmp_path), capsys, lorahot.SourceNotFoundError, message, **kwargs)
    assert online_hub.fetched() == []
    assert _diffusers_reads(online_hub, monkeypatch, subfolder)["base_model.model.proj.lora_A.weight"].shape[0] == 3
    inner = f"{subfolder}/" if subfolder else ""
    picked = next(n for n in files if n.startswith(mine))[len(inner) :]
    assert (
        lorahot.read_adapter(REPO, weight_name=picked, config={"r": 2, "lora_alpha": 2}, **kwargs).modules["proj"].rank
        == 2
    )


def test_offline_a_cached_listing_refuses_what_the_hubs_listing_refuses(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, the snapshot of PEFT's adapter_model.safetensors and its config was read where
    the file listing huggingface_hub cached for the commit shows that diffusers reads another file
    (sub/pytorch_lora_weights.safetensors), which a read through the Hub refuses; refused the same
    way now. A listing without it reads the snapshot."""
    import huggingface_hub

    for extra, loads in ((["sub/pytorch_lora_weights.safetensors"], False), (["sub/adapter_model.safetensors"], True)):
        tree = [SimpleNamespace(path=p) for p in ["adapter_config.json", "adapter_model.safetensors", *extra]]
        monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", lambda *a, tree=tree, **k: tree)
        if loads:
            assert lorahot.read_adapter(REPO).modules["proj"].scale == 0.5
        else:
            with pytest.raises(
                lorahot.SourceNotFoundError,
                match=rf"^{REPO}: this read opens adapter_model\.safetensors, but diffusers' load_lora_weights opens "
                r"sub/pytorch_lora_weights\.safetensors there",
            ):
                lorahot.read_adapter(REPO)


def test_a_file_fetched_alone_is_not_read_offline_for_the_file_a_whole_repo_read_picks(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A file fetched alone (weight_name=) was all the cache's snapshot showed offline, so a read
    of the whole repo there read it, silently, where a read through the Hub reads the repo's
    adapter_model.safetensors (another adapter). Offline, a
    file of another name is read only where the cache records that the repo has neither PEFT's
    nor diffusers' name there, as a whole-repo read online records; else refused naming the file
    and weight_name=, the runtime bitwise unchanged."""
    online_hub.serve(
        {
            "adapter_model.safetensors": _peft_bytes(4),
            "style.safetensors": _peft_bytes(4, seed=1),
            "adapter_config.json": b'{"r": 4, "lora_alpha": 8}',
        }
    )
    picked = lorahot.read_adapter(REPO).modules["proj"].A
    shutil.rmtree(
        Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    )  # a fresh cache: the style file fetched alone
    style = lorahot.read_adapter(REPO, weight_name="style.safetensors").modules["proj"].A
    assert not torch.equal(style, picked)
    online_hub.stalled = True  # offline must not ask
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    rig = _local_rig(tmp_path)
    _refused_everywhere(
        rig,
        capsys,
        lorahot.SourceNotFoundError,
        rf"^{REPO}: the local Hugging Face cache holds 'style\.safetensors' at the repo's top level, and cannot tell "
        r"whether the repo has adapter_model\.safetensors or pytorch_lora_weights\.safetensors there, which a read "
        r"picks first \(the Hub was not asked: OfflineModeIsEnabled: .*\)\. Pass weight_name='style\.safetensors'",
    )
    again = within(HANG_S, lambda: lorahot.read_adapter(REPO, weight_name="style.safetensors"))
    assert torch.equal(again.modules["proj"].A, style)


def test_a_repo_whose_only_file_has_another_name_loads_offline_once_read_online(
    online_hub: StandInHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-repo read online records that the repo has neither PEFT's nor diffusers' name
    (.no_exist), so the snapshot of its only file loads offline."""
    online_hub.serve({"style.safetensors": _peft_bytes(2), "adapter_config.json": b'{"r": 2, "lora_alpha": 4}'})
    assert lorahot.read_adapter(REPO).modules["proj"].scale == 2.0
    online_hub.stalled = True  # offline must not ask
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert within(HANG_S, lambda: lorahot.read_adapter(REPO)).modules["proj"].scale == 2.0


def test_the_cache_records_a_missing_file_as_huggingface_hub_records_it(online_hub: StandInHub) -> None:
    """The records an online whole-repo read writes of the files the listing lacks (the config,
    PEFT's and diffusers' names, in a subfolder here) are the very files huggingface_hub's
    hf_hub_download writes on the Hub's 'no such file' for the same names (path and empty
    content), so huggingface_hub's own later reads of the cache see what they would have."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    online_hub.serve({"sub/style.safetensors": _peft_bytes(2)})
    lorahot.read_adapter(REPO, subfolder="sub")
    records = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / ".no_exist"

    def recorded() -> dict[str, bytes]:
        return {p.relative_to(records).as_posix(): p.read_bytes() for p in records.rglob("*") if p.is_file()}

    mine = recorded()
    shutil.rmtree(records)
    for name in ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(REPO, name, subfolder="sub")
    assert mine == recorded() and len(mine) == 3 and set(mine.values()) == {b""}


@pytest.mark.parametrize("failing", ["sub/style.safetensors", "sub/adapter_config.json"], ids=["weights", "config"])
def test_a_fetch_that_fails_after_the_listing_records_nothing_in_the_cache(
    online_hub: StandInHub, capsys: pytest.CaptureFixture[str], tmp_path: Path, failing: str
) -> None:
    """The records of the files the listing lacks (.no_exist) were written before the downloads,
    so a load whose download then failed left them in the user's cache. They are written with
    the branch's ref now, once the downloads succeeded: a load failing on a download leaves no
    record and no ref, the runtime bitwise unchanged; once the file is served, the same load
    records them as before."""
    online_hub.serve({"sub/style.safetensors": _peft_bytes(2), "sub/adapter_config.json": b'{"r": 2, "lora_alpha": 4}'})
    online_hub.refused.add(failing)
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    message = rf"^{REPO}: cannot get sub from the Hub \("
    _refused_everywhere(_local_rig(tmp_path), capsys, lorahot.SourceNotFoundError, message, subfolder="sub")
    assert not (repo / ".no_exist").exists() and not (repo / "refs").exists()
    online_hub.refused.clear()
    assert lorahot.read_adapter(REPO, subfolder="sub").modules["proj"].scale == 2.0
    records = repo / ".no_exist" / COMMIT
    recorded = sorted(p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file())
    assert recorded == ["sub/adapter_model.safetensors", "sub/pytorch_lora_weights.safetensors"]
    assert (repo / "refs" / "main").read_text() == COMMIT


def test_a_hub_subfolder_with_a_trailing_slash_or_dot_is_the_folder(online_hub: StandInHub) -> None:
    """subfolder='sub/' was refused as leaving the repo, and subfolder='.' (the repo's top level)
    found nothing in the listing ('no .safetensors file at folder '.''); both read what 'sub' and
    no subfolder read."""
    online_hub.serve(
        {
            "adapter_model.safetensors": _peft_bytes(4),
            "adapter_config.json": b'{"r": 4, "lora_alpha": 8}',
            "sub/adapter_model.safetensors": _peft_bytes(2),
            "sub/adapter_config.json": b'{"r": 2, "lora_alpha": 8}',
        }
    )
    assert lorahot.read_adapter(REPO, subfolder=".").modules["proj"].scale == 2.0
    assert lorahot.read_adapter(REPO, subfolder="sub/").modules["proj"].scale == 4.0
    assert lorahot.read_adapter(REPO, subfolder="./sub").source == f"{REPO}/sub/adapter_model.safetensors"


#: answers of the Hub refusing a request, as huggingface_hub reads them (its hf_raise_for_status):
#: the status, the headers, the error it raises and the fix lorahot must name
_REFUSALS = {
    "403": (403, {}, "HfHubHTTPError", _LOG_IN),
    "401": (401, {}, "HfHubHTTPError|RepositoryNotFoundError", _LOG_IN),
    "403, gated": (403, {"X-Error-Code": "GatedRepo"}, "GatedRepoError", _LOG_IN),
    "401, gated": (401, {"X-Error-Code": "GatedRepo"}, "GatedRepoError", _LOG_IN),
    "404, gated": (404, {"X-Error-Code": "GatedRepo"}, "GatedRepoError", _LOG_IN),
    "no metadata": (
        200,
        {},  # no ETag, no X-Repo-Commit: what a proxy stripping the Hub's headers answers
        "FileMetadataError",
        r"The Hub's answer lacked the file's metadata \(its ETag or commit\): a proxy or mirror \(HF_ENDPOINT\)",
    ),
}


@pytest.mark.parametrize("refusal", list(_REFUSALS))
@pytest.mark.parametrize(
    "refused, kwargs, what",
    [
        ("adapter_model.safetensors", {"weight_name": "adapter_model.safetensors"}, "get adapter_model.safetensors"),
        ("adapter_config.json", {"weight_name": "adapter_model.safetensors"}, "fetch adapter_config.json"),
        (f"/api/models/{REPO}/revision/main", {}, "get the adapter"),
        ("adapter_model.safetensors", {}, "get the adapter"),
        ("adapter_config.json", {}, "get the adapter"),
    ],
    ids=["file", "file's config", "listing", "repo's file", "repo's config"],
)
def test_a_refused_request_is_refused_with_the_fix_for_its_refusal_not_for_being_offline(
    online_hub: StandInHub,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    refusal: str,
    refused: str,
    kwargs: dict[str, str],
    what: str,
) -> None:
    """huggingface_hub 2.4's hf_hub_download relays a 403 on a file's metadata request (a token
    refused for the file), like a server error or an answer without the file's metadata, as its
    LocalEntryNotFoundError ("cannot reach the Hub, no cached file"): the load was refused telling
    the user to go online (HF_HUB_OFFLINE) instead of to log in or pass token=. Through the HTTP
    path, each refusal (the Hub's gated answers with their X-Error-Code too) names the Hub's error
    and its fix, for the file, its config, the listing and a whole repo's files; read_adapter,
    load into either slot, preload and lorahot inspect refuse it, the runtime bitwise unchanged,
    no ref and no record in the cache."""
    status, headers, error, fix = _REFUSALS[refusal]
    if status == 200 and refused.startswith("/api/"):
        pytest.skip("the file metadata is no part of a listing's answer")
    online_hub.serve({"adapter_model.safetensors": _peft_bytes(4), "adapter_config.json": b'{"r": 4, "lora_alpha": 8}'})
    online_hub.answers[refused] = (status, headers)
    message = rf"^{REPO}: cannot {what} from the Hub \(({error}): .*\)[.,] .*{fix}"
    _refused_everywhere(_local_rig(tmp_path), capsys, lorahot.SourceNotFoundError, message, **kwargs)
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"
    assert not (repo / ".no_exist").exists()
    if not kwargs:  # hf_hub_download itself writes the ref of a file fetched alone at a branch
        assert not (repo / "refs").exists()


def test_a_ref_of_a_damaged_cache_that_leads_to_another_repo_is_refused(hub_cache: Path) -> None:
    """A ``refs/main`` holding a path out of the repo's folder (a damaged cache) had an offline
    read of the repo serve another repo's snapshot, silently; huggingface_hub refuses it for a
    single file (weight_name=) only."""
    own = hub_cache / f"models--{REPO.replace('/', '--')}"
    other = hub_cache / "models--lorahot-test--other"
    shutil.copytree(own, other)
    save_file(_peft_tensors(2), other / "snapshots" / COMMIT / "adapter_model.safetensors")
    (own / "refs" / "main").write_text(f"../../{other.name}/snapshots/{COMMIT}")
    for kwargs in ({}, {"weight_name": "adapter_model.safetensors"}):
        with pytest.raises(lorahot.SourceNotFoundError, match=rf"^{REPO}: "):
            lorahot.read_adapter(REPO, **kwargs)
    with pytest.raises(lorahot.SourceNotFoundError, match=r"refs/main leads to .*models--lorahot-test--other.*damaged"):
        lorahot.read_adapter(REPO)
    (own / "refs" / "main").write_text(COMMIT)
    assert lorahot.read_adapter(REPO).modules["proj"].rank == 4  # the repo's own snapshot
