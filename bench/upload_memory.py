"""Peak memory of the API process while it receives a large upload.

Starts `dare api` (embedded SQLite and filesystem broker in a scratch DARE_HOME; no worker, so
the job just stays queued), makes a ~500 MB history zip in /tmp, streams it with httpx, and
samples the API process's resident memory from /proc every 20 ms. Prints a table.

    python -m bench.upload_memory [--mb 500] [--chunked] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx

MiB = 1024 * 1024


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found")


def make_zip(path: Path, mb: int) -> None:
    """A zip holding one incompressible 'checkpoint' of ``mb`` MiB (stored, not deflated)."""
    block = os.urandom(MiB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        with z.open("epoch_1.safetensors", "w", force_zip64=True) as f:
            for i in range(mb):
                # vary each block cheaply so nothing downstream can deduplicate it
                f.write(i.to_bytes(8, "little") + block[8:])


def tiny_onnx() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((10, 64), np.float32), "fc.weight")
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "fc.weight"],
                                                                     ["y"], transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop_flag = pid, every, 0, False

    def run(self) -> None:
        while not self.stop_flag:
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(self.every)


def post(base: str, model: bytes, zip_path: Path, chunked: bool) -> httpx.Response:
    if not chunked:
        with zip_path.open("rb") as h:
            return httpx.post(f"{base}/v1/jobs", files={"model": ("model.onnx", model),
                                                        "history": ("history.zip", h)},
                              data={"dataset": "digits"}, timeout=600)
    boundary = "benchboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; "
               "filename=\"model.onnx\"\r\n\r\n").encode() + model + b"\r\n"
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"dataset\"\r\n\r\n"
               "digits\r\n").encode()
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"history\"; "
               "filename=\"history.zip\"\r\n\r\n").encode()
        with zip_path.open("rb") as f:
            while chunk := f.read(MiB):
                yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    return httpx.post(f"{base}/v1/jobs", content=body(), timeout=600,
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500, help="size of the uploaded zip in MiB")
    ap.add_argument("--chunked", action="store_true", help="also send it without Content-Length")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="dare-bench-upload-"))
    zip_path = Path(tempfile.gettempdir()) / f"dare-bench-{args.mb}mb.zip"
    if not zip_path.exists() or zip_path.stat().st_size < args.mb * MiB:
        print(f"writing {zip_path} ({args.mb} MiB)...", flush=True)
        make_zip(zip_path, args.mb)
    size = zip_path.stat().st_size
    env = {**os.environ, "DARE_HOME": str(scratch), "DARE_MAX_UPLOAD_BYTES": str(4 * size),
           "OMP_NUM_THREADS": "1",
           # the upload path alone: no key to manage, no child process loading the stand-in files
           "DARE_AUTH": "open", "DARE_SUBMIT_INSPECTION": "off"}
    dare = [sys.executable, "-c", "from service.cli.main import main; raise SystemExit(main())"]
    subprocess.run([*dare, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    log = (scratch / "api.log").open("wb")
    api = subprocess.Popen([*dare, "api", "--port", str(port)], env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        model = tiny_onnx()
        # warm up: the first submission imports onnx and friends
        small = scratch / "small.zip"
        with zipfile.ZipFile(small, "w") as z:
            z.writestr("epoch_1.safetensors", b"x")
        assert post(base, model, small, False).status_code == 202
        modes = ["content-length"] + (["chunked"] if args.chunked else [])
        for mode in modes:
            before = rss_kib(api.pid)
            sampler = Sampler(api.pid)
            sampler.start()
            t0 = time.perf_counter()
            r = post(base, model, zip_path, mode == "chunked")
            dt = time.perf_counter() - t0
            sampler.stop_flag = True
            sampler.join()
            assert r.status_code == 202, r.text[:500]
            hist = {i["field"]: i for i in r.json()["inputs"]}["history"]
            assert hist["size"] == size, (hist["size"], size)
            rows.append((mode, size / MiB, before / 1024, sampler.peak / 1024,
                         (sampler.peak - before) / 1024, dt, size / MiB / dt))
        hwm = rss_kib(api.pid, "VmHWM") / 1024
    finally:
        api.terminate()
        api.wait(20)
        log.close()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
            zip_path.unlink(missing_ok=True)

    print(f"\nAPI process memory while receiving one upload (dare api, {os.cpu_count()} CPUs)")
    print(f"{'mode':<15}{'upload MiB':>11}{'RSS before':>12}{'RSS peak':>10}{'peak - before':>15}"
          f"{'seconds':>9}{'MiB/s':>8}")
    for mode, mb, b, p, d, dt, tput in rows:
        print(f"{mode:<15}{mb:>11.0f}{b:>10.0f} M{p:>8.0f} M{d:>13.0f} M{dt:>9.1f}{tput:>8.0f}")
    print(f"VmHWM (peak RSS over the process's life): {hwm:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
