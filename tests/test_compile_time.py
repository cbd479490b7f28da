"""benchmarks/compile_time.py's plumbing, with a fake build in place of the child process
(a real one compiles a train step: minutes on a GPU)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compile_time  # noqa: E402


def test_variants_are_checked_and_their_flags_joined():
  with pytest.raises(SystemExit):
    compile_time.parse_args(["--variants", "default,autotune"])
  env = compile_time.variant_env("autotune0+cublas+native", {"XLA_FLAGS": "--user_flag"})
  assert env["XLA_FLAGS"] == ("--user_flag --xla_gpu_autotune_level=0 "
                              "--xla_gpu_enable_triton_gemm=false")
  assert env["EFFVIT_NATIVE_CONVS"] == "1"
  assert compile_time.variant_env("rewrites", {})["EFFVIT_NATIVE_CONVS"] == "0"
  assert "XLA_FLAGS" not in compile_time.variant_env("default", {})


def test_each_variant_is_a_build_of_its_own_and_cache_compiles_twice(capsys):
  calls = []

  def fake_run(argv, env):   # compiles fast from the second call over the same cache
    cache = env["JAX_COMPILATION_CACHE_DIR"]
    warm = any(c == cache and cache for c, _ in calls)
    calls.append((cache, env.get("XLA_FLAGS", "")))
    return {"compile_s": 2.0 if warm else (80.0 if "autotune" not in calls[-1][1] else 40.0),
            "img_s": 100.0 if "autotune" not in calls[-1][1] else 25.0}

  compile_time.main(["--models", "pvt_v2_b0", "--variants", "default+cache,autotune0"],
                    run=fake_run)
  out = capsys.readouterr().out.splitlines()
  assert len(calls) == 3 and calls[0][0] == calls[1][0] != "" and calls[2][0] == ""
  assert "compile   80.0 s (1.00x), cached    2.0 s" in out[1]
  assert "compile   40.0 s (0.50x)" in out[2] and "25.0 img/s (0.25x)" in out[2]


def test_a_failed_variant_is_reported_and_the_rest_still_run(capsys):
  def fake_run(argv, env):
    if "triton_gemm" in env.get("XLA_FLAGS", ""):
      raise SystemExit("compile_time.py: the build failed (exit 1):\nUnknown flag")
    return {"compile_s": 10.0, "img_s": 50.0}

  compile_time.main(["--variants", "cublas,default"], run=fake_run)
  out = capsys.readouterr().out.splitlines()
  assert "the build failed" in out[1] and "compile   10.0 s (1.00x)" in out[-1]
