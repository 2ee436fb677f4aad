"""The HTTP API's request and response bodies as pydantic models (``openapi`` builds
/openapi.json from them and the route table).

Request bodies are parsed with these models (a malformed body gets a clear 400); responses
are built as plain dicts on the hot paths and documented by the models here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from nodeflow.queue import MAX_NUMBER

# -- requests ---------------------------------------------------------------------------------------


class PromptRequest(BaseModel):
    """POST /prompt. Unknown fields are ignored (clients send more than ComfyUI reads)."""

    model_config = ConfigDict(extra="ignore")

    prompt: dict[str, Any] | None = Field(None, description="The workflow in ComfyUI's API format")
    client_id: str | None = Field(None, max_length=256, description="Where the WebSocket events go")
    extra_data: dict[str, Any] = Field(default_factory=dict, description="e.g. extra_pnginfo (the UI workflow)")
    front: bool = Field(False, description="Queue before everything pending")
    number: float | None = Field(None, allow_inf_nan=False, ge=-MAX_NUMBER, le=MAX_NUMBER,
                                 description="Queue position: lower runs first (finite, at most 2**53 in magnitude)")
    prompt_id: str | None = Field(None, min_length=1, max_length=128,
                                  description="Chosen by the client (default: a UUID)")
    partial_execution_targets: list[str] | None = Field(None, description="Run only these output nodes")


class QueueAction(BaseModel):
    """POST /queue and POST /history."""

    model_config = ConfigDict(extra="ignore")

    clear: bool = False
    delete: list[str] = Field(default_factory=list)


class InterruptRequest(BaseModel):
    """POST /interrupt: the running prompt, or only ``prompt_id`` if it is the running one."""

    model_config = ConfigDict(extra="ignore")

    prompt_id: str | None = None


class FreeRequest(BaseModel):
    """POST /free (ComfyUI's): release cached models and memory between prompts."""

    model_config = ConfigDict(extra="ignore")

    unload_models: bool = False
    free_memory: bool = False


class UploadForm(BaseModel):
    """POST /upload/image (multipart/form-data)."""

    image: bytes = Field(description="The file", json_schema_extra={"format": "binary"})
    overwrite: Literal["true", "1", "false", "0"] | None = Field(
        None, description="Replace a file of the same name (else 'name (1).png' ...)")
    subfolder: str = ""
    type: Literal["input", "temp", "output"] = "input"


class MaskUploadForm(UploadForm):
    """POST /upload/mask: ``image``'s alpha channel is written into the original's."""

    original_ref: str = Field(description='JSON: {"filename", "subfolder", "type"} of the image to mask')


# -- responses ----------------------------------------------------------------------------------------


class ComfyError(BaseModel):
    type: str
    message: str
    details: str
    extra_info: dict[str, Any] = Field(default_factory=dict)


class NodeErrors(BaseModel):
    errors: list[ComfyError]
    dependent_outputs: list[str]
    class_type: str


class ErrorResponse(BaseModel):
    """ComfyUI's error shape (400 on POST /prompt; other routes give ``error`` alone)."""

    error: ComfyError | None
    node_errors: dict[str, NodeErrors] = Field(default_factory=dict)


class PromptResponse(BaseModel):
    prompt_id: str
    number: float
    node_errors: dict[str, NodeErrors] = Field(description="Outputs that will not run, and why")


class ExecInfo(BaseModel):
    queue_remaining: int


class PromptStatus(BaseModel):
    exec_info: ExecInfo


class QueueResponse(BaseModel):
    """Entries are ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""

    queue_running: list[list[Any]]
    queue_pending: list[list[Any]]


class Worker(BaseModel):
    """A worker that runs prompts."""

    id: str
    host: str
    pid: int | None
    device: str
    state: Literal["starting", "idle", "busy", "dead"]
    prompt_id: str | None = Field(None, description="the prompt it runs now")
    models: list[str] = Field(description="model files it holds, 'kind/name', the most recently used last")
    prompts_done: int
    last_used: float | None = Field(None, description="when it last ran a prompt (Unix time)")
    error: str | None = Field(None, description="why it is dead or failed to start")


class WorkersResponse(BaseModel):
    workers: list[Worker]


class ImageRef(BaseModel):
    filename: str
    subfolder: str = ""
    type: Literal["input", "output", "temp"] = "output"


class HistoryStatus(BaseModel):
    status_str: Literal["success", "error"]
    completed: bool
    messages: list[list[Any]] = Field(description="[[event, data], ...]")


class HistoryEntry(BaseModel):
    prompt: list[Any] = Field(description="[number, prompt_id, prompt, extra_data, outputs_to_execute]")
    outputs: dict[str, dict[str, Any]] = Field(description='{node_id: {"images": [ImageRef, ...], ...}}')
    status: HistoryStatus
    meta: dict[str, dict[str, Any]] = Field(default_factory=dict)


class History(RootModel[dict[str, HistoryEntry]]):
    """``{prompt_id: HistoryEntry}``, oldest first (``{}`` for an unknown id)."""


class UploadResponse(BaseModel):
    name: str
    subfolder: str
    type: str


class Job(BaseModel):
    id: str
    status: Literal["pending", "in_progress", "completed", "failed", "cancelled"]
    priority: float
    create_time: int | None = None
    execution_start_time: int | None = None
    execution_end_time: int | None = None
    execution_error: dict[str, Any] | None = None
    outputs_count: int = 0
    preview_output: dict[str, Any] | None = None
    workflow_id: str | None = None


class JobDetail(Job):
    """One job; a finished one also with its outputs, execution status and workflow."""

    outputs: dict[str, Any] | None = None
    execution_status: dict[str, Any] | None = None
    workflow: dict[str, Any] | None = Field(None, description='{"prompt", "extra_data"}')


class Pagination(BaseModel):
    offset: int
    limit: int | None
    total: int
    has_more: bool


class JobsResponse(BaseModel):
    jobs: list[Job]
    pagination: Pagination


class SystemInfo(BaseModel):
    os: str
    python_version: str
    embedded_python: bool = False
    comfyui_version: str
    pytorch_version: str
    argv: list[str]
    ram_total: int
    ram_free: int


class Device(BaseModel):
    name: str
    type: str
    index: int | None
    vram_total: int
    vram_free: int
    torch_vram_total: int
    torch_vram_free: int


class SystemStats(BaseModel):
    system: SystemInfo
    devices: list[Device]


class Features(BaseModel):
    supports_preview_metadata: bool
    max_upload_size: int


class Deleted(BaseModel):
    deleted: int = Field(description="how many entries were deleted")


class Freed(BaseModel):
    freed: bool


class Users(BaseModel):
    """Single-user mode (no ``users`` key: no login screen)."""

    storage: str
    migrated: bool


class FileInfo(BaseModel):
    path: str
    size: int
    modified: float


class ModelFolder(BaseModel):
    name: str
    folders: list[str]


class ModelFile(BaseModel):
    name: str
    pathIndex: int
    modified: float | None = None
    size: int | None = None


class NodeInfo(BaseModel):
    """One node type's schema in ComfyUI's /object_info shape."""

    model_config = ConfigDict(extra="allow")

    input: dict[str, Any]
    input_order: dict[str, list[str]]
    output: list[Any]
    output_is_list: list[bool]
    output_name: list[str]
    name: str
    display_name: str
    description: str
    python_module: str
    category: str
    output_node: bool


class ObjectInfo(RootModel[dict[str, NodeInfo]]):
    """``{class name: NodeInfo}`` (``{}`` for an unknown one)."""
