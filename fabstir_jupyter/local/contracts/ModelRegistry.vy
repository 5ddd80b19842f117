# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title ModelRegistry (local network)
@notice The models hosts may serve. View functions have the signatures of the
        production ModelRegistry (spec/PROTOCOL.md section 8); the owner adds models.
@dev A model id is keccak256(repo + "/" + fileName).
"""

MAX_MODELS: constant(uint256) = 1024
MAX_NAME: constant(uint256) = 256

struct Model:
    repo: String[MAX_NAME]
    fileName: String[MAX_NAME]
    sha256Hash: bytes32
    approvalTier: uint256
    active: bool
    timestamp: uint256

event ModelAdded:
    modelId: indexed(bytes32)
    repo: String[MAX_NAME]
    fileName: String[MAX_NAME]

event ModelDeactivated:
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
def addModel(
    repo: String[MAX_NAME],
    fileName: String[MAX_NAME],
    sha256Hash: bytes32,
    approvalTier: uint256,
) -> bytes32:
    """
    @notice Add (or re-activate) a model; only the owner may. Return its id.
    """
    assert msg.sender == self.owner, "not owner"
    assert len(repo) > 0 and len(fileName) > 0, "empty name"
    model_id: bytes32 = keccak256(concat(repo, "/", fileName))
    if self.models[model_id].timestamp == 0:
        self.modelIds.append(model_id)
    self.models[model_id] = Model(
        repo=repo,
        fileName=fileName,
        sha256Hash=sha256Hash,
        approvalTier=approvalTier,
        active=True,
        timestamp=block.timestamp,
    )
    log ModelAdded(modelId=model_id, repo=repo, fileName=fileName)
    return model_id


@external
def deactivateModel(modelId: bytes32):
    """
    @notice Mark a model inactive; only the owner may. It stays listed.
    """
    assert msg.sender == self.owner, "not owner"
    assert self.models[modelId].timestamp != 0, "unknown model"
    self.models[modelId].active = False
    log ModelDeactivated(modelId=modelId)


@view
@external
def getAllModels() -> DynArray[bytes32, MAX_MODELS]:
    return self.modelIds


@view
@external
def getModel(modelId: bytes32) -> (String[MAX_NAME], String[MAX_NAME], bytes32, uint256, bool, uint256):
    """
    @notice Return (repo, fileName, sha256Hash, approvalTier, active, timestamp);
            all empty for an unknown id.
    """
    m: Model = self.models[modelId]
    return m.repo, m.fileName, m.sha256Hash, m.approvalTier, m.active, m.timestamp


@view
@external
def isActiveModel(modelId: bytes32) -> bool:
    return self.models[modelId].active
