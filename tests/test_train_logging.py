"""The trainer's logger: step time, images/s and the input-pipeline wait between two logs."""
import json
import os

from cassr_jax.train import loop


def test_logger_reports_the_input_wait_and_warns_once_when_input_bound(tmp_path, capsys):
  now = [100.0]
  logger = loop.Logger(str(tmp_path), total=10, initial=0, images_per_step=4, num_workers=3, clock=lambda: now[0])
  metrics = {"loss": 0.5, "lr": 1e-5, "grad_norm": 1.0}
  logger.log(1, metrics)  # first log: no interval yet
  logger.waited_for_data(0.5)
  now[0] += 2.0
  logger.log(3, metrics)  # 2 steps in 2 s, 0.5 s of it blocked on data
  assert "input-bound" not in capsys.readouterr().out
  logger.waited_for_data(3.0)
  now[0] += 4.0
  logger.log(5, metrics)  # data-bound: 3 of 4 s
  logger.waited_for_data(4.0)
  now[0] += 4.0
  logger.log(7, metrics)
  logger.close()
  out = capsys.readouterr().out
  assert out.count("input-bound: 75% of the time") == 1 and "num_workers, now 3" in out  # warned once
  with open(os.path.join(tmp_path, loop.METRICS_FILE)) as f:
    lines = [json.loads(line) for line in f]
  assert "data_wait" not in lines[0]
  assert [(r["step"], r["step_time"], r["images_per_s"], r["data_wait"]) for r in lines[1:]] == [
      (3, 1.0, 4.0, 0.25), (5, 2.0, 2.0, 0.75), (7, 2.0, 2.0, 1.0)]
