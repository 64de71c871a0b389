"""`boltzformer cohort`: segment every scan of a cohort on Dask, from a laptop to a cluster.

    run_cohort("scans/", "out/", "lung nodule")                                  # a LocalCluster here
    run_cohort("cases.csv", "out/", None, ScanOptions(seed=1), scheduler="tcp://host:8786")

Scans are Dask tasks. Each worker loads the model once, through a :class:`SegmenterPlugin`, and
keeps it for every scan it is given; the task reads the scan, segments it as ``boltzformer
segment`` would (same options, same seed: the same mask) and writes its mask (uint8 (z, y, x),
1 = lesion, the scan's exact geometry) atomically (``io.write_volume``) as
``<case_id>_mask.unrecorded.nii.gz``. Only a small row (status, seconds, lesions) travels back;
the client renames the mask to ``<case_id>_mask.nii.gz`` and writes ``lesions.csv`` and
``report.csv`` as the results arrive, one durable append per scan (lesions first, then the
report row that records the scan as done), so a cohort that is killed half-way loses nothing
that was recorded, a mask under its final name is one the report lists, and ``--resume`` redoes
exactly the rest (removing the unrecorded masks). ``--overwrite`` removes the earlier cohort's
masks before it starts again.

Workers and OUT_DIR: the workers write the masks themselves, so OUT_DIR and the scans must be
reachable from every worker under the same paths (a shared file system on a cluster).

A scan that cannot be read or segmented is a ``failed`` row with a one-line reason, never a
stopped cohort. A task whose worker dies (killed for memory, a lost node) is run once more,
then reported failed.

Modules: `scans` (what to segment), `worker` (the model on each worker, one scan as a task),
`tables` (report.csv and lesions.csv), `cluster` (memory, workers, the local cluster) and `run`
(run_cohort).
"""

from .run import EXIT_SOME_FAILED, REPORT_NAME, CohortSummary, run_cohort
from .scans import Scan, ScanOptions, list_scans

__all__ = ["run_cohort", "CohortSummary", "ScanOptions", "Scan", "list_scans", "REPORT_NAME", "EXIT_SOME_FAILED"]
