// streamkd browser client, protocol v1 (docs/protocol.md). No dependencies.
//
// Playback is paced by the frames' pts, not by a client timer: the first frame of an epoch sets
// an anchor JITTER_MS in the future, a frame is shown when the clock reaches anchor + pts, and
// frames that are later than LATE_MS re-anchor the clock (a stall shows as a pause, not as a
// fast-forward). Credit goes back to the server as frames are shown, so a slow tab receives
// fewer frames (the server drops the oldest) instead of an ever-growing backlog.
"use strict";

const HEADER_SIZE = 36;
const MAGIC = 0x46444b53; // "SKDF" read as a little-endian uint32
const FLAGS = { KEYFRAME: 1, DROPPED: 2, CHUNK_START: 4, EPOCH_START: 8, PROMPT_CHANGED: 16 };
const WINDOW = 8; // credits: frames in flight
const JITTER_MS = 120;
const LATE_MS = 250;
const KEYS = {
  ArrowUp: "up", KeyW: "up", ArrowDown: "down", KeyS: "down",
  ArrowLeft: "left", KeyA: "left", ArrowRight: "right", KeyD: "right",
};

const $ = (id) => document.getElementById(id);
const field = (name) => document.querySelector(`input[name=${name}]`);
const canvas = $("view");
const ctx = canvas.getContext("2d");

// Everything the page knows, exposed as window.streamkd for automation (tests read it).
const S = (window.streamkd = {
  ws: null, welcome: null, epoch: 0, started: false, paused: false,
  buffer: [], anchor: null, unreturned: 0,
  actionSeq: 0, held: [], actionSent: new Map(), actionLatencies: [],
  startSentAt: 0, firstFrameLatency: null,
  framesShown: 0, framesLate: 0, framesDropped: 0, shownTimes: [], lastShown: null, errors: [],
});

function parseHeader(buf) {
  if (buf.byteLength < HEADER_SIZE) throw new Error("short frame message");
  const v = new DataView(buf);
  if (v.getUint32(0, true) !== MAGIC || v.getUint8(4) !== 1) throw new Error("not a v1 frame message");
  return {
    flags: v.getUint8(5), codec: v.getUint8(6), headerSize: v.getUint8(7),
    epoch: v.getUint32(8, true), frameSeq: v.getUint32(12, true), chunkSeq: v.getUint32(16, true),
    actionSeq: v.getUint32(20, true), ptsUs: Number(v.getBigUint64(24, true)), dropped: v.getUint32(32, true),
  };
}

function send(msg) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(msg));
}

function status(text) { $("status").textContent = text; }

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  S.ws = ws;
  ws.onopen = () => {
    const hello = { type: "hello", version: 1, codecs: ["jpeg"], credits: WINDOW };
    if (field("token").value) hello.token = field("token").value;
    ws.send(JSON.stringify(hello));
  };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onEvent(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => {
    status(`closed ${ev.code} ${ev.reason}`);
    S.started = false;
  };
}

function onEvent(msg) {
  switch (msg.type) {
    case "welcome":
      S.welcome = msg;
      canvas.width = canvas.height = msg.model.frame_size[0];
      status("connected: press start");
      break;
    case "started":
      S.epoch = msg.epoch; S.started = true; S.paused = false;
      S.buffer = []; S.anchor = null; S.firstFrameLatency = null;
      status(`streaming "${msg.prompt}"`);
      break;
    case "prompt_applied": status(`streaming "${msg.prompt}" (from frame ${msg.frame_seq})`); break;
    case "stopped": S.started = false; status("stopped"); break;
    case "paused": S.paused = true; status("paused"); break;
    case "resumed": S.paused = false; S.anchor = null; status("streaming"); break;
    case "error": S.errors.push(msg); status(`error ${msg.code}: ${msg.message}`); break;
  }
}

async function onFrame(buf) {
  const arrival = performance.now();
  let h;
  try { h = parseHeader(buf); } catch (e) { S.errors.push({ code: "client", message: String(e) }); return; }
  if (h.epoch < S.epoch) return;
  S.framesDropped += h.dropped;
  if (S.firstFrameLatency === null) S.firstFrameLatency = arrival - S.startSentAt;
  for (const [seq, sent] of S.actionSent) {
    if (seq > h.actionSeq) continue;
    if (seq === h.actionSeq) S.actionLatencies.push(arrival - sent);
    S.actionSent.delete(seq);
  }
  const bitmap = await createImageBitmap(new Blob([new Uint8Array(buf, h.headerSize)], { type: "image/jpeg" }));
  S.buffer.push({ h, bitmap });
  S.buffer.sort((a, b) => a.h.frameSeq - b.h.frameSeq);
}

function returnCredit(n) {
  S.unreturned += n;
  if (S.unreturned >= WINDOW / 2) { send({ type: "credit", frames: S.unreturned }); S.unreturned = 0; }
}

function play(now) {
  requestAnimationFrame(play);
  if (!S.buffer.length) return;
  if (S.anchor === null) S.anchor = now + JITTER_MS - S.buffer[0].h.ptsUs / 1000;
  if (now - (S.anchor + S.buffer[0].h.ptsUs / 1000) > LATE_MS) {
    S.anchor = now - S.buffer[0].h.ptsUs / 1000; // fell behind: re-anchor rather than rush
  }
  let show = null, consumed = 0;
  while (S.buffer.length && S.anchor + S.buffer[0].h.ptsUs / 1000 <= now) {
    if (show) { show.bitmap.close(); S.framesLate++; }
    show = S.buffer.shift(); consumed++;
  }
  if (!show) return;
  ctx.drawImage(show.bitmap, 0, 0, canvas.width, canvas.height);
  show.bitmap.close();
  S.framesShown++; S.lastShown = show.h;
  S.shownTimes.push(now);
  returnCredit(consumed);
}

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function renderStats() {
  const now = performance.now();
  S.shownTimes = S.shownTimes.filter((t) => now - t < 1000);
  const ms = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(0)} ms`);
  $("fps").textContent = S.shownTimes.length.toFixed(0);
  $("ffl").textContent = ms(S.firstFrameLatency);
  const lat = S.actionLatencies.slice(-20);
  $("afl").textContent = `${ms(lat[lat.length - 1])} / ${ms(median(lat))}`;
  $("act").textContent = `${S.held[S.held.length - 1] || "none"} / ${S.lastShown ? S.lastShown.actionSeq : "–"}`;
  $("drop").textContent = `${S.framesDropped} / ${S.framesLate}`;
  $("buf").textContent = `${S.buffer.length} frames`;
  $("seq").textContent = S.lastShown ? `${S.lastShown.epoch} / ${S.lastShown.frameSeq}` : "–";
}

function sendAction() {
  const action = S.held[S.held.length - 1] || "none";
  S.actionSeq += 1;
  S.actionSent.set(S.actionSeq, performance.now());
  send({ type: "action", seq: S.actionSeq, action });
}

function onKey(ev, down) {
  const action = KEYS[ev.code];
  if (!action || ev.target instanceof HTMLInputElement) return;
  ev.preventDefault();
  if (ev.repeat) return;
  S.held = S.held.filter((a) => a !== action);
  if (down) S.held.push(action); // the most recent key wins while several are held
  sendAction();
}

function startMessage() {
  return { prompt: field("prompt").value, seed: Number(field("seed").value) || 0 };
}

$("start").onclick = () => {
  S.startSentAt = performance.now();
  send({ type: S.started ? "reset" : "start", ...startMessage() });
  canvas.focus();
};
$("reset").onclick = () => { S.startSentAt = performance.now(); send({ type: "reset", ...startMessage() }); };
$("prompt").onclick = () => send({ type: "prompt", prompt: field("prompt").value });
$("pause").onclick = () => send({ type: S.paused ? "resume" : "pause" });
$("stop").onclick = () => send({ type: "stop" });
window.addEventListener("keydown", (ev) => onKey(ev, true));
window.addEventListener("keyup", (ev) => onKey(ev, false));
if (location.hash.startsWith("#token=")) field("token").value = decodeURIComponent(location.hash.slice(7));
field("token").addEventListener("change", () => { if (S.ws) S.ws.close(); connect(); });

connect();
requestAnimationFrame(play);
setInterval(renderStats, 250);
