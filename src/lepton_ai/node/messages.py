"""Messages between the node programs (msgspec tagged structs, see ``lepton_ai.wire``).

Four conversations, four unions, so each port decodes only what belongs to it:

* ``CoordinatorMessage`` - what workers and clients send the coordinator (and
  its replies). A worker's first message is ``Register``; a client's is any
  request, each answered by exactly one reply.
* ``WorkerMessage`` - what the coordinator sends a registered worker.
* ``ShuffleMessage`` - reducers pulling buckets from a node's shuffle server.
* ``ExecMessage`` - the private pipe between a node agent and its executors.

Tasks travel in structs of their own, not in the scheduler core's events and
actions, so the wire carries only what the receiver cannot know and the core can
change without changing the protocol:

* ``TaskOrder`` (in ``RunTasks``): a dispatched attempt, without the worker it is
  sent to. ``node.coord_outbox.task_order`` makes it from the core's ``Dispatch``.
* ``TaskReport`` (in ``Reports``): ``StartedReport``, ``SucceededReport``,
  ``FailedReport``, ``FetchFailedReport``, without a worker or a time: the
  coordinator's connection names the worker and its clock times the event
  (``node.control.task_event`` makes the core's ``TaskStarted`` and friends).
* ``ExecOutcome``: an executor's one answer per attempt; its ``kind``
  (``ExecOutcomeKind``) is the core's ``FailureKind`` plus "done" and
  "corrupt_input". The agent turns it into a report in one place
  (``node.agent_tasks.outcome_report``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from lepton_ai.compute.job_state import OutputRef
from lepton_ai.compute.plan import JobOptions
from lepton_ai.compute.scheduler_events import FailureKind, RunningReport, TaskAttempt
from lepton_ai.monitor.tasklog import TaskSpan
from lepton_ai.serve.spec import (
    DeploymentCommand,
    DeploymentInfo,
    Endpoint,
    ReplicaAssignment,
    ReplicaReport,
)
from lepton_ai.storage.control import (
    CommitObject,
    DeleteObject,
    ListObjects,
    ObjectInfo,
    ObjectList,
    Placement,
    PlaceObject,
    StatObject,
    StorageCheck,
    StorageReport,
    StorageUsage,
)
from lepton_ai.storage.messages import (
    Chunk,
    DataError,
    DataOk,
    DeleteObjects,
    GetObject,
    LocalWritten,
    NodeAddr,
    ObjectHeader,
    PutDone,
    PutObject,
)

# ------------------------------------------------------------ worker <-> coordinator


class ExecutorInfo(msgspec.Struct, frozen=True):
    slot: int
    pid: int
    state: str  # "starting" | "idle" | "busy"
    restarts: int = 0


class Register(msgspec.Struct, frozen=True, tag=True):
    """A worker agent joins; ``worker`` is unique per agent incarnation."""

    worker: str
    name: str
    address: str
    slots: int
    pid: int
    running: list[RunningReport] = []
    executors: int = 0  # processes serving the ``slots`` (0: one per slot)
    # The storage node behind the agent: its stable id (kept across restarts in its
    # data directory, unlike ``worker``) and the room its object store has.
    node: str = ""
    storage: StorageUsage | None = None
    # Serving: this node's balancer (``http://host:port``), how many replicas it may
    # run, and those it runs now (a new leader adopts them).
    serve_url: str = ""
    serve_slots: int = 0
    replicas: list[ReplicaReport] = []
    metrics: str = ""  # host:port of the agent's HTTP /metrics


class Registered(msgspec.Struct, frozen=True, tag=True):
    """``accepted=False``: this worker id was declared lost; rejoin under a new one."""

    coordinator: str
    heartbeat_interval_s: float
    accepted: bool = True


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    running: list[RunningReport]
    executors: list[ExecutorInfo]
    storage: StorageUsage | None = None
    replicas: list[ReplicaReport] = []  # the serving replicas this node runs
    inflight: dict[str, int] = {}  # requests its balancer has at replicas, per deployment


class CopyResult(msgspec.Struct, frozen=True):
    oid: str
    ok: bool
    message: str = ""


class StorageNotice(msgspec.Struct, frozen=True, tag=True):
    """Agent -> leader: replicas found corrupt (and deleted) here, copies finished,
    and objects held here for longer than the orphan grace, for the leader to judge
    (it answers ``DropObjects`` with those no committed object lists on this node)."""

    corrupt: list[str] = []
    copies: list[CopyResult] = []
    check: list[str] = []


class StartedReport(msgspec.Struct, frozen=True, tag=True):
    """The attempt began running in its executor (it may have waited behind others)."""

    attempt: TaskAttempt


class SucceededReport(msgspec.Struct, frozen=True, tag=True):
    """The attempt's outputs, as in ``TaskSucceeded``."""

    attempt: TaskAttempt
    outputs: list[OutputRef]


class FailedReport(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    """The attempt ended without output; the fields are ``TaskFailed``'s."""

    attempt: TaskAttempt
    kind: FailureKind
    message: str = ""
    exc_type: str = ""
    traceback: str = ""


class FetchFailedReport(msgspec.Struct, frozen=True, tag=True):
    """The attempt could not read input ``map_partition`` of stage ``map_stage`` from
    ``source_worker``. Whether that is news (``FetchFailed.stale``) only the
    coordinator can judge, so the worker has no say in it."""

    attempt: TaskAttempt
    map_stage: int
    map_partition: int
    source_worker: str


TaskReport = StartedReport | SucceededReport | FailedReport | FetchFailedReport


class Reports(msgspec.Struct, frozen=True, tag=True):
    reports: list[TaskReport]


class JobPlanBlob(msgspec.Struct, frozen=True):
    job_id: str
    plan: bytes
    shuffle_replicas: int = 1  # the job's option: copies of each map output (1 if unsaid)


class TaskOrder(msgspec.Struct, frozen=True, omit_defaults=True):
    """Run ``attempt`` in scheduler slot ``slot``; ``inputs`` and ``addresses`` as in
    ``Dispatch`` (where each map output of the parent stage lives; a task reading no
    shuffle sends neither)."""

    attempt: TaskAttempt
    slot: int
    inputs: list[OutputRef] = []
    addresses: dict[str, str] = {}


class RunTasks(msgspec.Struct, frozen=True, tag=True):
    """Plans the worker has not been sent yet, then the tasks to start."""

    plans: list[JobPlanBlob]
    tasks: list[TaskOrder]


class CancelTasks(msgspec.Struct, frozen=True, tag=True):
    """Stop these attempts; ``queued_only``: only those not started yet (work stealing)."""

    attempts: list[TaskAttempt]
    queued_only: bool = False


class DropJobs(msgspec.Struct, frozen=True, tag=True):
    """These jobs are over: forget their plans and delete their shuffle files."""

    job_ids: list[str]


class CopyOrder(msgspec.Struct, frozen=True):
    oid: str
    sources: list[str]  # data-plane addresses of live replicas, best first


class CopyObjects(msgspec.Struct, frozen=True, tag=True):
    """Leader -> agent: pull these objects from a live replica into this node's store,
    answer each with ``StorageNotice.copies``."""

    orders: list[CopyOrder]


class DropObjects(msgspec.Struct, frozen=True, tag=True):
    """Leader -> agent: these objects are no longer stored here (deleted, replaced,
    an excess replica, or never committed): delete their bytes."""

    oids: list[str]


class NodeDirectory(msgspec.Struct, frozen=True, tag=True):
    """Leader -> agent: every live storage node and its data-plane address (sent on
    registration and when it changes), for reading inputs and placing replicas."""

    nodes: list[NodeAddr]


class RunReplicas(msgspec.Struct, frozen=True, tag=True):
    """Leader -> agent: the serving replicas this node must run, all of them (the agent
    starts what is missing and drains and stops what is not listed)."""

    replicas: list[ReplicaAssignment]


class ServeEndpoints(msgspec.Struct, frozen=True, tag=True):
    """Leader -> agent: every ready replica in the cluster, for this node's balancer."""

    endpoints: list[Endpoint]
    deployments: list[str] = []  # every deployment, with or without a ready replica


WorkerMessage = (
    Registered
    | RunTasks
    | CancelTasks
    | DropJobs
    | CopyObjects
    | DropObjects
    | NodeDirectory
    | RunReplicas
    | ServeEndpoints
)

# ------------------------------------------------------------ client <-> coordinator


class SubmitJob(msgspec.Struct, frozen=True, tag=True):
    plan: bytes
    options: JobOptions
    job_id: str = ""


class JobAccepted(msgspec.Struct, frozen=True, tag=True):
    job_id: str


class WaitJob(msgspec.Struct, frozen=True, tag=True):
    """Answer when the job has ended or after ``timeout_s`` (0: at once)."""

    job_id: str
    timeout_s: float = 0.0


class JobInfo(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    status: str  # "running" | "finished" | "failed" | "unknown"
    done: int
    total: int
    name: str = ""
    submitted_at: float = 0.0
    finished_at: float = 0.0
    # msgspec-encoded ``JobRecord`` once the job has ended (plan + result parts or error).
    record: bytes | None = None


class ListJobs(msgspec.Struct, frozen=True, tag=True):
    pass


class JobList(msgspec.Struct, frozen=True, tag=True):
    jobs: list[JobInfo]


class MemberInfo(msgspec.Struct, frozen=True):
    role: str  # "coordinator" | "worker" | "executor"
    id: str
    pid: int
    address: str
    health: str  # "alive" | "suspect" | "dead" | "starting" | "idle" | "busy"
    node: str = ""  # the worker id an executor belongs to
    phi: float = 0.0
    paxos: str = ""  # a replicated coordinator's Paxos (and KV) address
    metrics: str = ""  # host:port of its HTTP /metrics (an executor's: its agent's)
    serve: str = ""  # a worker's serving balancer (http://host:port; "" none)


class GetStatus(msgspec.Struct, frozen=True, tag=True):
    """Cluster status; with ``workers > 0`` wait (up to ``timeout_s``) until that many
    workers are registered with every executor started."""

    workers: int = 0
    timeout_s: float = 0.0


class ClusterInfo(msgspec.Struct, frozen=True, tag=True):
    leader: str
    members: list[MemberInfo]


class Event(msgspec.Struct, frozen=True):
    """One line of a timeline; ``t`` is wall-clock seconds (time.time())."""

    t: float
    kind: str
    detail: str = ""
    job_id: str = ""


class GetEvents(msgspec.Struct, frozen=True, tag=True):
    job_id: str = ""


class EventList(msgspec.Struct, frozen=True, tag=True):
    events: list[Event]


class GetJobTasks(msgspec.Struct, frozen=True, tag=True):
    """The leader's record of which worker ran each attempt of a job, and when."""

    job_id: str


class JobTasks(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    spans: list[TaskSpan]
    dropped: int = 0  # attempts past ``tasklog.SPANS_PER_JOB_MAX`` (the oldest go)


class RecordEvent(msgspec.Struct, frozen=True, tag=True):
    """A client reports something for the timeline (e.g. a fault it injected)."""

    event: Event


class Ok(msgspec.Struct, frozen=True, tag=True):
    pass


class ErrorReply(msgspec.Struct, frozen=True, tag=True):
    # "invalid" | "unavailable" | "not_found" | "redirect" (message: leader or "")
    # | "full" (StorageFull) | "exists" (CommitObject if_absent) | "limit" (LimitExceeded)
    kind: str
    message: str


class CancelJob(msgspec.Struct, frozen=True, tag=True):
    """Client -> coordinator: stop a running job (its attempts are cancelled; it ends
    as failed with a "cancelled" error, so ``job.result()`` raises ``JobCancelled``)."""

    job_id: str


class DeleteJob(msgspec.Struct, frozen=True, tag=True):
    """Client -> coordinator: forget a finished (or failed) job and its result."""

    job_id: str


class ChangeDeployment(msgspec.Struct, frozen=True, tag=True):
    """Client -> leader: create, update, scale, roll back or delete a deployment;
    answered with ``Deployments`` (the one changed; none after a delete)."""

    command: DeploymentCommand


class GetDeployments(msgspec.Struct, frozen=True, tag=True):
    """Client -> leader: one deployment by name, or all ("")."""

    name: str = ""


class Deployments(msgspec.Struct, frozen=True, tag=True):
    deployments: list[DeploymentInfo]


CoordinatorMessage = (
    Register
    | Heartbeat
    | Reports
    | SubmitJob
    | WaitJob
    | ListJobs
    | GetStatus
    | GetEvents
    | GetJobTasks
    | RecordEvent
    | DeleteJob
    | CancelJob
    | StorageNotice
    | PlaceObject
    | CommitObject
    | StatObject
    | ListObjects
    | DeleteObject
    | StorageCheck
    | ChangeDeployment
    | GetDeployments
)
ClientReply = (
    JobAccepted
    | JobInfo
    | JobList
    | ClusterInfo
    | EventList
    | JobTasks
    | Ok
    | ErrorReply
    | Placement
    | ObjectInfo
    | ObjectList
    | StorageReport
    | Deployments
)

# ------------------------------------------------------------ shuffle server


class PutShuffle(msgspec.Struct, frozen=True, tag=True):
    """Agent -> agent (``node.shuffle_copy``): store the shuffle file ``stem`` of
    ``job_id`` (``size`` bytes; chunks follow)."""

    job_id: str
    stem: str
    size: int
    chunk_bytes: int


class FetchBlocks(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    blocks: list[str]


class BlockData(msgspec.Struct, frozen=True, tag=True):
    """``status[i]`` is "ok", "missing" or "corrupt"; ``data[i]`` is b"" unless ok."""

    status: list[str]
    data: list[bytes]


# The node's data port: shuffle buckets, copies of shuffle files and stored objects.
ShuffleMessage = (
    FetchBlocks
    | BlockData
    | PutShuffle
    | PutObject
    | Chunk
    | GetObject
    | LocalWritten
    | ObjectHeader
    | PutDone
    | DeleteObjects
    | DataOk
    | DataError
)

# ------------------------------------------------------------ agent <-> executor


class ExecHello(msgspec.Struct, frozen=True, tag=True):
    pid: int


class ExecPlan(msgspec.Struct, frozen=True, tag=True):
    job_id: str
    plan: bytes


class ExecRun(msgspec.Struct, frozen=True, tag=True):
    """Run one attempt; ``inputs`` are the shuffle buckets in map order (already fetched).

    ``local``: map index -> block name of inputs held by this node's block store,
    which the executor reads itself (their ``inputs`` entry is empty): no copy
    through the agent and the pipe, and the agent's loop is not blocked on the read.
    """

    attempt: TaskAttempt
    inputs: list[bytes] = []
    local: dict[int, str] = {}


class ExecForget(msgspec.Struct, frozen=True, tag=True):
    job_ids: list[str]


# "done", or how the attempt failed: the scheduler's kinds, and "corrupt_input" (a
# shuffle input did not decode: the agent reports a fetch failure of its map).
ExecOutcomeKind = Literal["done", "corrupt_input", FailureKind]


class ExecOutcome(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    """The executor's answer to an ``ExecRun``: ``outputs`` and ``duration_s`` when
    done; else ``message`` and, for user code, ``exc_type`` and ``traceback``;
    ``map_partition`` names the corrupt input. (Fields left at their defaults are
    not sent: a success does not carry a failure's empty fields, nor the reverse.)"""

    attempt: TaskAttempt
    kind: ExecOutcomeKind
    outputs: list[OutputRef] = []
    duration_s: float = 0.0
    message: str = ""
    exc_type: str = ""
    traceback: str = ""
    map_partition: int = -1


class ExecCancel(msgspec.Struct, frozen=True, tag=True):
    """Drop these attempts if they have not started yet (answered with an
    ``ExecOutcome`` of kind "cancelled"); one already running or done is answered as
    usual."""

    attempts: list[TaskAttempt]


ExecMessage = ExecHello | ExecPlan | ExecRun | ExecForget | ExecOutcome | ExecCancel
