from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuantSpec(_message.Message):
    __slots__ = ("format", "granularity", "group_size", "tile", "block_size", "axis", "scale_encoding", "out_dtype")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    SCALE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    OUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    format: str
    granularity: str
    group_size: int
    tile: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    axis: int
    scale_encoding: str
    out_dtype: str
    def __init__(self, format: _Optional[str] = ..., granularity: _Optional[str] = ..., group_size: _Optional[int] = ..., tile: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ..., axis: _Optional[int] = ..., scale_encoding: _Optional[str] = ..., out_dtype: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor", "offset", "data", "crc32c")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class QuantizeHeader(_message.Message):
    __slots__ = ("tensor", "spec", "return_dequantized", "return_report", "chunk_bytes", "checksums", "regions", "cuda", "scales", "return_amax")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RETURN_DEQUANTIZED_FIELD_NUMBER: _ClassVar[int]
    RETURN_REPORT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    RETURN_AMAX_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorInfo
    spec: QuantSpec
    return_dequantized: bool
    return_report: bool
    chunk_bytes: int
    checksums: bool
    regions: RegionTensors
    cuda: CudaTensors
    scales: _containers.RepeatedScalarFieldContainer[float]
    return_amax: bool
    def __init__(self, tensor: _Optional[_Union[TensorInfo, _Mapping]] = ..., spec: _Optional[_Union[QuantSpec, _Mapping]] = ..., return_dequantized: _Optional[bool] = ..., return_report: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., checksums: _Optional[bool] = ..., regions: _Optional[_Union[RegionTensors, _Mapping]] = ..., cuda: _Optional[_Union[CudaTensors, _Mapping]] = ..., scales: _Optional[_Iterable[float]] = ..., return_amax: _Optional[bool] = ...) -> None: ...

class QuantizedOperand(_message.Message):
    __slots__ = ("spec", "shape", "codes", "scales", "zero_points", "tensor_scale")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SCALE_FIELD_NUMBER: _ClassVar[int]
    spec: QuantSpec
    shape: _containers.RepeatedScalarFieldContainer[int]
    codes: TensorInfo
    scales: TensorInfo
    zero_points: TensorInfo
    tensor_scale: TensorInfo
    def __init__(self, spec: _Optional[_Union[QuantSpec, _Mapping]] = ..., shape: _Optional[_Iterable[int]] = ..., codes: _Optional[_Union[TensorInfo, _Mapping]] = ..., scales: _Optional[_Union[TensorInfo, _Mapping]] = ..., zero_points: _Optional[_Union[TensorInfo, _Mapping]] = ..., tensor_scale: _Optional[_Union[TensorInfo, _Mapping]] = ...) -> None: ...

class DequantizeHeader(_message.Message):
    __slots__ = ("operand", "out_dtype", "chunk_bytes", "checksums", "regions", "cuda")
    OPERAND_FIELD_NUMBER: _ClassVar[int]
    OUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    operand: QuantizedOperand
    out_dtype: str
    chunk_bytes: int
    checksums: bool
    regions: RegionTensors
    cuda: CudaTensors
    def __init__(self, operand: _Optional[_Union[QuantizedOperand, _Mapping]] = ..., out_dtype: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., checksums: _Optional[bool] = ..., regions: _Optional[_Union[RegionTensors, _Mapping]] = ..., cuda: _Optional[_Union[CudaTensors, _Mapping]] = ...) -> None: ...

class TensorOperand(_message.Message):
    __slots__ = ("tensor", "spec")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorInfo
    spec: QuantSpec
    def __init__(self, tensor: _Optional[_Union[TensorInfo, _Mapping]] = ..., spec: _Optional[_Union[QuantSpec, _Mapping]] = ...) -> None: ...

class MatmulOperand(_message.Message):
    __slots__ = ("tensor", "quantized")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    tensor: TensorOperand
    quantized: QuantizedOperand
    def __init__(self, tensor: _Optional[_Union[TensorOperand, _Mapping]] = ..., quantized: _Optional[_Union[QuantizedOperand, _Mapping]] = ...) -> None: ...

class MatmulHeader(_message.Message):
    __slots__ = ("a", "b", "out_dtype", "chunk_bytes", "checksums", "regions", "cuda")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    OUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    a: MatmulOperand
    b: MatmulOperand
    out_dtype: str
    chunk_bytes: int
    checksums: bool
    regions: RegionTensors
    cuda: CudaTensors
    def __init__(self, a: _Optional[_Union[MatmulOperand, _Mapping]] = ..., b: _Optional[_Union[MatmulOperand, _Mapping]] = ..., out_dtype: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., checksums: _Optional[bool] = ..., regions: _Optional[_Union[RegionTensors, _Mapping]] = ..., cuda: _Optional[_Union[CudaTensors, _Mapping]] = ...) -> None: ...

class QuantizeRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: QuantizeHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[QuantizeHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class DequantizeRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DequantizeHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[DequantizeHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class MatmulRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: MatmulHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[MatmulHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class OutputHeader(_message.Message):
    __slots__ = ("tensors", "scale_layout")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SCALE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    scale_layout: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., scale_layout: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("amax", "sqnr_db", "saturated", "nan_count")
    AMAX_FIELD_NUMBER: _ClassVar[int]
    SQNR_DB_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    amax: float
    sqnr_db: float
    saturated: int
    nan_count: int
    def __init__(self, amax: _Optional[float] = ..., sqnr_db: _Optional[float] = ..., saturated: _Optional[int] = ..., nan_count: _Optional[int] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("bytes", "crc32c", "report", "placement", "amax")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    AMAX_FIELD_NUMBER: _ClassVar[int]
    bytes: _containers.RepeatedScalarFieldContainer[int]
    crc32c: _containers.RepeatedScalarFieldContainer[int]
    report: Report
    placement: str
    amax: float
    def __init__(self, bytes: _Optional[_Iterable[int]] = ..., crc32c: _Optional[_Iterable[int]] = ..., report: _Optional[_Union[Report, _Mapping]] = ..., placement: _Optional[str] = ..., amax: _Optional[float] = ...) -> None: ...

class QuantizeResponse(_message.Message):
    __slots__ = ("header", "chunk", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: OutputHeader
    chunk: Chunk
    summary: Summary
    def __init__(self, header: _Optional[_Union[OutputHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class DequantizeResponse(_message.Message):
    __slots__ = ("header", "chunk", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: OutputHeader
    chunk: Chunk
    summary: Summary
    def __init__(self, header: _Optional[_Union[OutputHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class MatmulResponse(_message.Message):
    __slots__ = ("header", "chunk", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: OutputHeader
    chunk: Chunk
    summary: Summary
    def __init__(self, header: _Optional[_Union[OutputHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_tensor_bytes", "chunk_bytes", "max_message_bytes", "max_concurrent_streams")
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    max_tensor_bytes: int
    chunk_bytes: int
    max_message_bytes: int
    max_concurrent_streams: int
    def __init__(self, max_tensor_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "backend", "device", "formats", "granularities", "scale_encodings", "input_dtypes", "limits", "draining", "device_uuid", "devices", "ipc_device_uuids", "instance", "local_socket")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITIES_FIELD_NUMBER: _ClassVar[int]
    SCALE_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    IPC_DEVICE_UUIDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    device: str
    formats: _containers.RepeatedScalarFieldContainer[str]
    granularities: _containers.RepeatedScalarFieldContainer[str]
    scale_encodings: _containers.RepeatedScalarFieldContainer[str]
    input_dtypes: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    draining: bool
    device_uuid: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    ipc_device_uuids: _containers.RepeatedScalarFieldContainer[str]
    instance: str
    local_socket: str
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., formats: _Optional[_Iterable[str]] = ..., granularities: _Optional[_Iterable[str]] = ..., scale_encodings: _Optional[_Iterable[str]] = ..., input_dtypes: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., draining: _Optional[bool] = ..., device_uuid: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., ipc_device_uuids: _Optional[_Iterable[str]] = ..., instance: _Optional[str] = ..., local_socket: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "name", "uuid", "requests_in_flight", "bytes_in_flight", "requests_total")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    device: str
    name: str
    uuid: str
    requests_in_flight: int
    bytes_in_flight: int
    requests_total: int
    def __init__(self, device: _Optional[str] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., requests_in_flight: _Optional[int] = ..., bytes_in_flight: _Optional[int] = ..., requests_total: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("session", "name", "size", "nonce", "memfd")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MEMFD_FIELD_NUMBER: _ClassVar[int]
    session: str
    name: str
    size: int
    nonce: bytes
    memfd: MemoryFile
    def __init__(self, session: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., memfd: _Optional[_Union[MemoryFile, _Mapping]] = ...) -> None: ...

class MemoryFile(_message.Message):
    __slots__ = ("pid", "fd")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class UnregisterRegionRequest(_message.Message):
    __slots__ = ("session", "region")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    session: str
    region: str
    def __init__(self, session: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class UnregisterRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegionStatusRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class RegionInfo(_message.Message):
    __slots__ = ("region", "name", "size", "pinned")
    REGION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    region: str
    name: str
    size: int
    pinned: bool
    def __init__(self, region: _Optional[str] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class RegionStatusResponse(_message.Message):
    __slots__ = ("regions", "server_regions", "kept_storages")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_REGIONS_FIELD_NUMBER: _ClassVar[int]
    KEPT_STORAGES_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[RegionInfo]
    server_regions: int
    kept_storages: int
    def __init__(self, regions: _Optional[_Iterable[_Union[RegionInfo, _Mapping]]] = ..., server_regions: _Optional[int] = ..., kept_storages: _Optional[int] = ...) -> None: ...

class RegionRef(_message.Message):
    __slots__ = ("region", "offset", "size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class RegionTensors(_message.Message):
    __slots__ = ("session", "inputs", "outputs")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    session: str
    inputs: _containers.RepeatedCompositeFieldContainer[RegionRef]
    outputs: _containers.RepeatedCompositeFieldContainer[RegionRef]
    def __init__(self, session: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[RegionRef, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[RegionRef, _Mapping]]] = ...) -> None: ...

class LocalRequest(_message.Message):
    __slots__ = ("quantize", "dequantize", "matmul")
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DEQUANTIZE_FIELD_NUMBER: _ClassVar[int]
    MATMUL_FIELD_NUMBER: _ClassVar[int]
    quantize: QuantizeHeader
    dequantize: DequantizeHeader
    matmul: MatmulHeader
    def __init__(self, quantize: _Optional[_Union[QuantizeHeader, _Mapping]] = ..., dequantize: _Optional[_Union[DequantizeHeader, _Mapping]] = ..., matmul: _Optional[_Union[MatmulHeader, _Mapping]] = ...) -> None: ...

class LocalResponse(_message.Message):
    __slots__ = ("code", "details", "summary")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    summary: Summary
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class CudaIpcTensor(_message.Message):
    __slots__ = ("handle", "storage_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "offset_bytes", "keep", "kept")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    storage_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    offset_bytes: int
    keep: bool
    kept: bool
    def __init__(self, handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., offset_bytes: _Optional[int] = ..., keep: _Optional[bool] = ..., kept: _Optional[bool] = ...) -> None: ...

class CudaTensors(_message.Message):
    __slots__ = ("session", "device_uuid", "inputs", "outputs", "release")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    session: str
    device_uuid: str
    inputs: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    outputs: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    release: _containers.RepeatedCompositeFieldContainer[CudaIpcTensor]
    def __init__(self, session: _Optional[str] = ..., device_uuid: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ..., release: _Optional[_Iterable[_Union[CudaIpcTensor, _Mapping]]] = ...) -> None: ...
