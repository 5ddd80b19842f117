# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title ModelRegistry (local network)
@notice The models hosts may serve. Every function and event shares its name,
        signature, outputs and selector with the production ModelRegistry
        (spec/production-abi.txt): `getModel` returns one struct, as there.
@dev A model id is keccak256(repo + "/" + fileName). Only the owner adds models
     (`addTrustedModel`, tier 1); production's community proposals and votes are
     left out.
"""

MAX_MODELS: constant(uint256) = 1024
MAX_NAME: constant(uint256) = 256
TRUSTED_TIER: constant(uint256) = 1

struct Model:
    huggingfaceRepo: String[MAX_NAME]
    fileName: String[MAX_NAME]
    sha256Hash: bytes32
    approvalTier: uint256
    active: bool
    timestamp: uint256

event ModelAdded:
    modelId: indexed(bytes32)
    huggingfaceRepo: String[MAX_NAME]
    fileName: String[MAX_NAME]
    tier: uint256

event ModelDeactivated:
    modelId: indexed(bytes32)

event ModelReactivated:
    modelId: indexed(bytes32)

owner: public(address)
models: HashMap[bytes32, Model]
modelIds: DynArray[bytes32, MAX_MODELS]


@deploy
def __init__():
    self.owner = msg.sender


@pure
@external
def getModelId(repo: String[MAX_NAME], fileName: String[MAX_NAME]) -> bytes32:
    """
    @notice Return keccak256(repo + "/" + fileName).
    """
    return keccak256(concat(repo, "/", fileName))


@external
def addTrustedModel(huggingfaceRepo: String[MAX_NAME], fileName: String[MAX_NAME], sha256Hash: bytes32):
    """
    @notice Add a model at tier 1 (trusted); only the owner may, once per id.
    """
    assert msg.sender == self.owner, "not owner"
    assert len(huggingfaceRepo) > 0 and len(fileName) > 0, "empty name"
    model_id: bytes32 = keccak256(concat(huggingfaceRepo, "/", fileName))
    assert self.models[model_id].timestamp == 0, "model already exists"
    self.modelIds.append(model_id)
    self.models[model_id] = Model(
        huggingfaceRepo=huggingfaceRepo,
        fileName=fileName,
        sha256Hash=sha256Hash,
        approvalTier=TRUSTED_TIER,
        active=True,
        timestamp=block.timestamp,
    )
    log ModelAdded(modelId=model_id, huggingfaceRepo=huggingfaceRepo, fileName=fileName, tier=TRUSTED_TIER)


@external
def deactivateModel(modelId: bytes32):
    """
    @notice Mark a model inactive (hosts can no longer register it); only the owner may.
    """
    assert msg.sender == self.owner, "not owner"
    assert self.models[modelId].timestamp != 0, "model does not exist"
    self.models[modelId].active = False
    log ModelDeactivated(modelId=modelId)


@external
def reactivateModel(modelId: bytes32):
    assert msg.sender == self.owner, "not owner"
    assert self.models[modelId].timestamp != 0, "model does not exist"
    self.models[modelId].active = True
    log ModelReactivated(modelId=modelId)


@view
@external
def getAllModels() -> DynArray[bytes32, MAX_MODELS]:
    return self.modelIds


@view
@external
def getModel(modelId: bytes32) -> Model:
    """
    @notice Return the model as one struct (huggingfaceRepo, fileName, sha256Hash,
            approvalTier, active, timestamp); all empty for an unknown id.
    """
    return self.models[modelId]


@view
@external
def isModelApproved(modelId: bytes32) -> bool:
    return self.models[modelId].active


@view
@external
def isTrustedModel(modelId: bytes32) -> bool:
    return self.models[modelId].approvalTier == TRUSTED_TIER and self.models[modelId].active


@view
@external
def getModelHash(modelId: bytes32) -> bytes32:
    return self.models[modelId].sha256Hash
