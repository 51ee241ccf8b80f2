// Publishing from the browser over WHIP (RFC 9725): POST the SDP offer with the
// bearer token, get 201 with the answer and a Location for the session, DELETE
// that Location to stop. ICE candidates are gathered before the POST (no trickle
// ICE, so no PATCH; RFC 9725 4.1 allows either).

const GATHER_TIMEOUT_MS = 3000;

function waitForIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, GATHER_TIMEOUT_MS); // send what we have
  });
}

/** Put H.264 first so the server can pass frames through without re-encoding. */
function preferH264(transceiver) {
  const caps = globalThis.RTCRtpSender?.getCapabilities?.("video");
  if (!caps || !transceiver.setCodecPreferences) return;
  const h264 = caps.codecs.filter((c) => c.mimeType.toLowerCase() === "video/h264");
  const rest = caps.codecs.filter((c) => c.mimeType.toLowerCase() !== "video/h264");
  // constrained baseline (42e01f / 42001f) first: what the receiver registers
  h264.sort((a, b) => Number(/profile-level-id=42/.test(b.sdpFmtpLine || "")) -
    Number(/profile-level-id=42/.test(a.sdpFmtpLine || "")));
  if (h264.length) transceiver.setCodecPreferences([...h264, ...rest]);
}

export class WhipPublisher extends EventTarget {
  constructor(url, token) {
    super();
    this.url = url;
    this.token = token;
    this.pc = null;
    this.location = null;
  }

  _state(state, detail = {}) {
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  async start(stream) {
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    this.pc = pc;
    pc.addEventListener("connectionstatechange", () => this._state(pc.connectionState));
    pc.addEventListener("iceconnectionstatechange",
      () => console.info(`whip ice: ${pc.iceConnectionState}`));
    for (const track of stream.getTracks()) {
      if (track.kind === "video") track.contentHint = "detail";
      const tr = pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
      if (track.kind === "video") preferH264(tr);
    }
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIce(pc);
    this._state("offering");
    const resp = await fetch(this.url, {
      method: "POST",
      headers: { "content-type": "application/sdp",
        ...(this.token ? { authorization: `Bearer ${this.token}` } : {}) },
      body: pc.localDescription.sdp,
    });
    if (resp.status !== 201) {
      let message = `WHIP POST answered ${resp.status}`;
      try {
        const body = await resp.json();
        if (body?.error?.message) message = body.error.message;
      } catch { /* not JSON */ }
      pc.close();
      this.pc = null;
      throw new Error(message);
    }
    const loc = resp.headers.get("location");
    this.location = loc ? new URL(loc, new URL(this.url, location.href)).toString() : null;
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    return this;
  }

  /** End the session (RFC 9725 4.2): DELETE first, then close the peer connection.
   * Closed first, the server saw the connection end, closed the session itself and
   * answered the DELETE 404. `unloading` (the page is going away) sends the DELETE
   * with `keepalive`, so it outlives the page. */
  async stop({ unloading = false } = {}) {
    const loc = this.location;
    this.location = null;
    const pc = this.pc;
    this.pc = null;
    if (loc) {
      // The (empty) body is read: a response left unread was reported as cancelled.
      await fetch(loc, { method: "DELETE", keepalive: unloading,
        headers: this.token ? { authorization: `Bearer ${this.token}` } : {} })
        .then((resp) => resp.arrayBuffer()).catch(() => {});
    }
    if (pc) pc.close();
    this._state("stopped");
  }
}
