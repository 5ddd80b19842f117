// An independent implementation of spec/PROTOCOL.md §6 on the @noble libraries the production
// SDK uses (@noble/curves for secp256k1, @noble/hashes, @noble/ciphers), written from the spec for
// tests/test_encryption_noble.py. It reads one JSON job on stdin and writes one JSON answer on stdout.
//
// Jobs (`op`):
//   kat          fixed keys and nonces -> every payload, for byte-for-byte comparison
//   host         act as a host: open an init and a message, encrypt a reply
//   client_init  act as the SDK: build an encrypted_session_init and an encrypted_message
//   client_read  act as the SDK: decrypt a reply with the session key, checking the chunk order
//   sdk_session  act as the SDK on a real socket (the `ws` package): for each prompt, a fresh
//                encrypted_session_init (nine payload fields, no id) and an encrypted_message with
//                the web search fields; read every frame up to stream_end and decrypt the answer
import { secp256k1 } from '@noble/curves/secp256k1';
import { sha256 } from '@noble/hashes/sha256';
import { hkdf } from '@noble/hashes/hkdf';
import { keccak_256 } from '@noble/hashes/sha3';
import { bytesToHex, hexToBytes, randomBytes, utf8ToBytes, concatBytes } from '@noble/hashes/utils';
import { xchacha20poly1305 } from '@noble/ciphers/chacha';

const text = new TextDecoder('utf-8', { fatal: true });
const unhex = (h) => hexToBytes(h.startsWith('0x') ? h.slice(2) : h);
const ZERO_SALT = new Uint8Array(32);
const EMPTY = new Uint8Array(0);

function address(pub) {
  const point = secp256k1.ProjectivePoint.fromHex(pub);
  return '0x' + bytesToHex(keccak_256(point.toRawBytes(false).slice(1)).slice(-20));
}

function initKey(priv, pub) {
  const shared = secp256k1.getSharedSecret(priv, pub, true).slice(1); // x-coordinate only
  return hkdf(sha256, shared, ZERO_SALT, EMPTY, 32);
}

function transcript(ephPub, hostPub, nonce) {
  const bar = utf8ToBytes('|');
  return sha256(concatBytes(utf8ToBytes('E2EEv1|'), ephPub, bar, hostPub, bar, ZERO_SALT, bar, nonce, bar, EMPTY));
}

function sign65(digest, priv) {
  const sig = secp256k1.sign(digest, priv);
  return concatBytes(sig.toCompactRawBytes(), new Uint8Array([sig.recovery]));
}

function recoverAddress(sig, digest) {
  const s = secp256k1.Signature.fromCompact(sig.slice(0, 64)).addRecoveryBit(sig[64] >= 27 ? sig[64] - 27 : sig[64]);
  return address(s.recoverPublicKey(digest).toRawBytes(true));
}

function seal(key, plaintext, aad, nonce) {
  const ct = xchacha20poly1305(key, nonce, aad).encrypt(plaintext);
  return { ciphertextHex: bytesToHex(ct), nonceHex: bytesToHex(nonce), aadHex: bytesToHex(aad) };
}

function open(key, payload) {
  const aad = unhex(payload.aadHex);
  const pt = xchacha20poly1305(key, unhex(payload.nonceHex), aad).decrypt(unhex(payload.ciphertextHex));
  return { plaintext: text.decode(pt), aad: text.decode(aad) };
}

function sealInit(hostPub, clientPriv, ephPriv, nonce, data) {
  const ephPub = secp256k1.getPublicKey(ephPriv, true);
  const ct = xchacha20poly1305(initKey(ephPriv, hostPub), nonce, EMPTY).encrypt(utf8ToBytes(JSON.stringify(data)));
  const sig = sign65(transcript(ephPub, hostPub, nonce), clientPriv);
  return {
    ephPubHex: bytesToHex(ephPub), saltHex: bytesToHex(ZERO_SALT), nonceHex: bytesToHex(nonce),
    ciphertextHex: bytesToHex(ct), signatureHex: bytesToHex(sig), recid: sig[64],
    alg: 'secp256k1-ecdh(ephemeral→static)+hkdf(sha256)+xchacha20-poly1305', info: '', aadHex: '',
  };
}

function openInit(hostPriv, payload) {
  const ephPub = unhex(payload.ephPubHex);
  const nonce = unhex(payload.nonceHex);
  const ct = unhex(payload.ciphertextHex);
  const pt = xchacha20poly1305(initKey(hostPriv, ephPub), nonce, unhex(payload.aadHex)).decrypt(ct);
  const sig = unhex(payload.signatureHex);
  const hostPub = secp256k1.getPublicKey(hostPriv, true);
  return {
    data: JSON.parse(text.decode(pt)),
    transcriptSigner: recoverAddress(sig, transcript(ephPub, hostPub, nonce)),
    ciphertextSigner: recoverAddress(sig, sha256(ct)),
  };
}

function replyFrames(key, sessionId, id, pieces, finishReason) {
  const frames = pieces.map((piece, i) => {
    const payload = { ...seal(key, utf8ToBytes(piece), utf8ToBytes(`chunk_${i}`), randomBytes(24)), index: i };
    const frame = { type: 'encrypted_chunk', tokens: piece ? 1 : 0, payload, id, session_id: sessionId };
    if (i === pieces.length - 1) frame.final = true;
    return frame;
  });
  frames.push({
    type: 'encrypted_response', id, session_id: sessionId,
    payload: seal(key, utf8ToBytes(finishReason), utf8ToBytes('encrypted_response_final'), randomBytes(24)),
  });
  return frames;
}

const jobs = {
  kat(job) {
    const hostPriv = unhex(job.hostPrivHex);
    const clientPriv = unhex(job.clientPrivHex);
    const hostPub = secp256k1.getPublicKey(hostPriv, true);
    const key = unhex(job.sessionKeyHex);
    return {
      hostPubHex: bytesToHex(hostPub),
      hostAddress: address(hostPub),
      clientAddress: address(secp256k1.getPublicKey(clientPriv, true)),
      initKeyHex: bytesToHex(initKey(unhex(job.ephPrivHex), hostPub)),
      transcriptHex: bytesToHex(transcript(secp256k1.getPublicKey(unhex(job.ephPrivHex), true), hostPub, unhex(job.initNonceHex))),
      init: sealInit(hostPub, clientPriv, unhex(job.ephPrivHex), unhex(job.initNonceHex), job.initData),
      message: seal(key, utf8ToBytes(JSON.stringify(job.body)), utf8ToBytes(`message_${job.messageIndex}`), unhex(job.messageNonceHex)),
      chunks: job.chunks.map((c, i) => ({ ...seal(key, utf8ToBytes(c.text), utf8ToBytes(`chunk_${i}`), unhex(c.nonceHex)), index: i })),
      response: seal(key, utf8ToBytes(job.finishReason), utf8ToBytes('encrypted_response_final'), unhex(job.responseNonceHex)),
    };
  },

  host(job) {
    const hostPriv = unhex(job.hostPrivHex);
    const init = openInit(hostPriv, job.init.payload);
    const key = unhex(init.data.sessionKey);
    const message = open(key, job.message.payload);
    return {
      ...init,
      request: JSON.parse(message.plaintext),
      messageAad: message.aad,
      frames: replyFrames(key, job.message.session_id, job.message.id, job.reply, job.finishReason),
    };
  },

  client_init(job) {
    const key = randomBytes(32);
    const data = { sessionKey: bytesToHex(key), jobId: String(job.jobId), modelName: job.model, pricePerToken: 0 };
    const payload = sealInit(unhex(job.hostPubHex), unhex(job.clientPrivHex), secp256k1.utils.randomPrivateKey(), randomBytes(24), data);
    const body = { prompt: job.prompt, model: job.model, max_tokens: job.maxTokens, temperature: 0.7, stream: true };
    return {
      sessionKeyHex: bytesToHex(key),
      init: { type: 'encrypted_session_init', payload, chain_id: job.chainId, session_id: job.sessionId, job_id: String(job.jobId) },
      message: {
        type: 'encrypted_message', session_id: job.sessionId, id: job.id,
        payload: seal(key, utf8ToBytes(JSON.stringify(body)), utf8ToBytes('message_0'), randomBytes(24)),
        web_search: false, max_searches: 0, search_queries: null,
      },
    };
  },

  client_read(job) {
    const key = unhex(job.sessionKeyHex);
    const pieces = [];
    let finishReason = null;
    for (const frame of job.frames) {
      const { plaintext, aad } = open(key, frame.payload);
      if (frame.type === 'encrypted_chunk') {
        if (aad !== `chunk_${pieces.length}` || frame.payload.index !== pieces.length) throw new Error(`chunk out of order: ${aad}`);
        pieces.push(plaintext);
      } else if (frame.type === 'encrypted_response') {
        if (aad !== 'encrypted_response_final') throw new Error(`bad response aad ${aad}`);
        finishReason = plaintext;
      }
    }
    return { pieces, finishReason };
  },
};

// One socket, frames read in order: next() resolves with the next frame, or rejects after 10 s.
async function openSocket(url) {
  const { default: WebSocket } = await import('ws');
  const ws = new WebSocket(url);
  const queue = [];
  const waiting = [];
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString('utf8'));
    if (waiting.length) waiting.shift()(frame); else queue.push(frame);
  });
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); });
  const next = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no frame within 10 s')), 10000);
    waiting.push((frame) => { clearTimeout(timer); resolve(frame); });
  }));
  return { ws, next, send: (frame) => ws.send(JSON.stringify(frame)) };
}

jobs.sdk_session = async (job) => {
  const socket = await openSocket(job.url);
  const greeting = await socket.next();
  const hostPub = unhex(job.hostPubHex);
  const clientPriv = unhex(job.clientPrivHex);
  const turns = [];
  for (const [i, prompt] of job.prompts.entries()) {
    // SessionManager.sendEncryptedInit: a new session key before every prompt, on the same socket.
    const key = randomBytes(32);
    const data = { sessionKey: bytesToHex(key), jobId: String(job.jobId), modelName: job.model, pricePerToken: 0 };
    const initNonce = randomBytes(24);
    const payload = sealInit(hostPub, clientPriv, secp256k1.utils.randomPrivateKey(), initNonce, data);
    socket.send({ type: 'encrypted_session_init', payload, chain_id: job.chainId, session_id: job.sessionId,
                  job_id: String(job.jobId) });
    const ack = await socket.next();
    // SessionManager.sendEncryptedMessage: the request encrypted as message_0 of the new key.
    const body = { prompt, model: job.model, max_tokens: job.maxTokens, temperature: 0.7, stream: true };
    const id = `${1767225600000 + i}-k3j9x`;
    socket.send({
      type: 'encrypted_message', session_id: job.sessionId, id,
      payload: seal(key, utf8ToBytes(JSON.stringify(body)), utf8ToBytes('message_0'), randomBytes(24)),
      web_search: false, max_searches: 0, search_queries: null,
    });
    const frames = [];
    const pieces = [];
    let finishReason = null;
    for (;;) {
      const frame = await socket.next();
      frames.push(frame);
      if (frame.type === 'encrypted_chunk') {
        const { plaintext, aad } = open(key, frame.payload);
        if (aad !== `chunk_${pieces.length}` || frame.payload.index !== pieces.length) throw new Error(`chunk out of order: ${aad}`);
        pieces.push(plaintext);
      } else if (frame.type === 'encrypted_response') {
        const { plaintext, aad } = open(key, frame.payload);
        if (aad !== 'encrypted_response_final') throw new Error(`bad response aad ${aad}`);
        finishReason = plaintext;
      } else if (frame.type === 'stream_end' || frame.type === 'error') {
        break;
      }
    }
    turns.push({ ack, id, frames, pieces, finishReason, ciphertextSigner: recoverAddress(unhex(payload.signatureHex), sha256(unhex(payload.ciphertextHex))) });
  }
  socket.ws.close();
  return { greeting, turns };
};

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', async () => {
  const job = JSON.parse(input);
  process.stdout.write(JSON.stringify(await jobs[job.op](job)));
});
