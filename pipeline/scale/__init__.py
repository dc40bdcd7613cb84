"""Scale out: fan teacher calls over a Prefect task runner (threads, Ray or Dask) sharing one response cache."""

from pipeline.scale.fanout import FanOutTeacher, answer_shard, make_task_runner

__all__ = ["FanOutTeacher", "answer_shard", "make_task_runner"]
