from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Platform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLATFORM_UNSPECIFIED: _ClassVar[Platform]
    PLATFORM_SIMULATED_SEV_SNP: _ClassVar[Platform]
    PLATFORM_SEV_SNP: _ClassVar[Platform]
    PLATFORM_AZURE_SEV_SNP: _ClassVar[Platform]
    PLATFORM_TDX: _ClassVar[Platform]
    PLATFORM_AZURE_TDX: _ClassVar[Platform]

class HpkeSuite(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HPKE_SUITE_UNSPECIFIED: _ClassVar[HpkeSuite]
    HPKE_SUITE_MLKEM768_X25519_HKDF_SHA256_CHACHA20POLY1305: _ClassVar[HpkeSuite]
    HPKE_SUITE_X25519_HKDF_SHA256_CHACHA20POLY1305: _ClassVar[HpkeSuite]
PLATFORM_UNSPECIFIED: Platform
PLATFORM_SIMULATED_SEV_SNP: Platform
PLATFORM_SEV_SNP: Platform
PLATFORM_AZURE_SEV_SNP: Platform
PLATFORM_TDX: Platform
PLATFORM_AZURE_TDX: Platform
HPKE_SUITE_UNSPECIFIED: HpkeSuite
HPKE_SUITE_MLKEM768_X25519_HKDF_SHA256_CHACHA20POLY1305: HpkeSuite
HPKE_SUITE_X25519_HKDF_SHA256_CHACHA20POLY1305: HpkeSuite

class EnclavePublicKey(_message.Message):
    __slots__ = ("suite", "mlkem768", "x25519")
    SUITE_FIELD_NUMBER: _ClassVar[int]
    MLKEM768_FIELD_NUMBER: _ClassVar[int]
    X25519_FIELD_NUMBER: _ClassVar[int]
    suite: HpkeSuite
    mlkem768: bytes
    x25519: bytes
    def __init__(self, suite: _Optional[_Union[HpkeSuite, str]] = ..., mlkem768: _Optional[bytes] = ..., x25519: _Optional[bytes] = ...) -> None: ...

class GpuEvidence(_message.Message):
    __slots__ = ("kind", "arch", "report", "cert_chain", "index")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[GpuEvidence.Kind]
        KIND_GPU: _ClassVar[GpuEvidence.Kind]
        KIND_NVSWITCH: _ClassVar[GpuEvidence.Kind]
    KIND_UNSPECIFIED: GpuEvidence.Kind
    KIND_GPU: GpuEvidence.Kind
    KIND_NVSWITCH: GpuEvidence.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    kind: GpuEvidence.Kind
    arch: str
    report: bytes
    cert_chain: bytes
    index: int
    def __init__(self, kind: _Optional[_Union[GpuEvidence.Kind, str]] = ..., arch: _Optional[str] = ..., report: _Optional[bytes] = ..., cert_chain: _Optional[bytes] = ..., index: _Optional[int] = ...) -> None: ...

class AzureVtpmEvidence(_message.Message):
    __slots__ = ("hcl_report", "tpm_quote_message", "tpm_quote_signature", "pcrs")
    HCL_REPORT_FIELD_NUMBER: _ClassVar[int]
    TPM_QUOTE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TPM_QUOTE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PCRS_FIELD_NUMBER: _ClassVar[int]
    hcl_report: bytes
    tpm_quote_message: bytes
    tpm_quote_signature: bytes
    pcrs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, hcl_report: _Optional[bytes] = ..., tpm_quote_message: _Optional[bytes] = ..., tpm_quote_signature: _Optional[bytes] = ..., pcrs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AmdCollateral(_message.Message):
    __slots__ = ("crl",)
    CRL_FIELD_NUMBER: _ClassVar[int]
    crl: bytes
    def __init__(self, crl: _Optional[bytes] = ...) -> None: ...

class IntelCollateral(_message.Message):
    __slots__ = ("tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain", "pck_crl", "pck_crl_issuer_chain", "root_ca_crl")
    TCB_INFO_FIELD_NUMBER: _ClassVar[int]
    TCB_INFO_ISSUER_CHAIN_FIELD_NUMBER: _ClassVar[int]
    QE_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    QE_IDENTITY_ISSUER_CHAIN_FIELD_NUMBER: _ClassVar[int]
    PCK_CRL_FIELD_NUMBER: _ClassVar[int]
    PCK_CRL_ISSUER_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ROOT_CA_CRL_FIELD_NUMBER: _ClassVar[int]
    tcb_info: bytes
    tcb_info_issuer_chain: bytes
    qe_identity: bytes
    qe_identity_issuer_chain: bytes
    pck_crl: bytes
    pck_crl_issuer_chain: bytes
    root_ca_crl: bytes
    def __init__(self, tcb_info: _Optional[bytes] = ..., tcb_info_issuer_chain: _Optional[bytes] = ..., qe_identity: _Optional[bytes] = ..., qe_identity_issuer_chain: _Optional[bytes] = ..., pck_crl: _Optional[bytes] = ..., pck_crl_issuer_chain: _Optional[bytes] = ..., root_ca_crl: _Optional[bytes] = ...) -> None: ...

class NvidiaCollateral(_message.Message):
    __slots__ = ("rims", "ocsp_responses")
    RIMS_FIELD_NUMBER: _ClassVar[int]
    OCSP_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    rims: _containers.RepeatedScalarFieldContainer[bytes]
    ocsp_responses: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, rims: _Optional[_Iterable[bytes]] = ..., ocsp_responses: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Collateral(_message.Message):
    __slots__ = ("amd", "intel", "nvidia")
    AMD_FIELD_NUMBER: _ClassVar[int]
    INTEL_FIELD_NUMBER: _ClassVar[int]
    NVIDIA_FIELD_NUMBER: _ClassVar[int]
    amd: AmdCollateral
    intel: IntelCollateral
    nvidia: NvidiaCollateral
    def __init__(self, amd: _Optional[_Union[AmdCollateral, _Mapping]] = ..., intel: _Optional[_Union[IntelCollateral, _Mapping]] = ..., nvidia: _Optional[_Union[NvidiaCollateral, _Mapping]] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("format_version", "platform", "cpu_report", "cpu_cert_chain", "gpus", "enclave_key", "claims", "nonce", "simulated", "azure", "collateral")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    CPU_REPORT_FIELD_NUMBER: _ClassVar[int]
    CPU_CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_KEY_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    AZURE_FIELD_NUMBER: _ClassVar[int]
    COLLATERAL_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    platform: Platform
    cpu_report: bytes
    cpu_cert_chain: bytes
    gpus: _containers.RepeatedCompositeFieldContainer[GpuEvidence]
    enclave_key: EnclavePublicKey
    claims: bytes
    nonce: bytes
    simulated: bool
    azure: AzureVtpmEvidence
    collateral: Collateral
    def __init__(self, format_version: _Optional[int] = ..., platform: _Optional[_Union[Platform, str]] = ..., cpu_report: _Optional[bytes] = ..., cpu_cert_chain: _Optional[bytes] = ..., gpus: _Optional[_Iterable[_Union[GpuEvidence, _Mapping]]] = ..., enclave_key: _Optional[_Union[EnclavePublicKey, _Mapping]] = ..., claims: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., simulated: _Optional[bool] = ..., azure: _Optional[_Union[AzureVtpmEvidence, _Mapping]] = ..., collateral: _Optional[_Union[Collateral, _Mapping]] = ...) -> None: ...
