"""Concurrent requests share `generate` calls and get the answers they get alone."""

import concurrent.futures

from tests.serve.conftest import MAX_BATCH, b64


def test_32_concurrent_requests_are_batched_and_answered_as_alone(served, tiny_snapshot):
  pictures = [b64(served.snowman), b64(tiny_snapshot / "tall.png")]
  tasks = [
    dict(task="caption_brief"),
    dict(task="reg", box=[0.1, 0.2, 0.6, 0.9]),
    dict(task="rec", phrase="a snowman"),
    dict(task="vqa", question="What is it?"),
  ]
  bodies = [dict(tasks[i % 4], image=pictures[i // 4 % 2]) for i in range(32)]
  alone = {}
  for body in bodies[:8]:  # the 8 distinct requests, one at a time
    status, answer = served.post(body)
    assert status == 200 and answer["timings"]["batch_size"] == 1, answer
    alone[repr(body)] = answer
  before = served.metrics()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(served.post, bodies))
  after = served.metrics()
  for body, (status, answer) in zip(bodies, answers):
    want = alone[repr(body)]
    assert status == 200, answer
    assert (answer["text"], answer["entities"], answer["token_ids"]) == (
      want["text"],
      want["entities"],
      want["token_ids"],
    )
  calls = after["generate_calls"] - before["generate_calls"]
  assert after["rows"] - before["rows"] == 32
  sizes = {
    k: after["batch_sizes"][k] - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]
  }
  assert 32 / MAX_BATCH <= calls < 32, sizes
  assert max(a["timings"]["batch_size"] for _, a in answers) > 1
  # The warm-up compiled every batch size these tasks use: nothing compiles now.
  assert after["compiles_after_warmup"] == before["compiles_after_warmup"]
