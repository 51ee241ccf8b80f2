// The HLS player: hls.js (from npm, built into /static/dist/hls.mjs) where the
// browser has Media Source Extensions, the browser's own HLS otherwise (Safari, iOS).
// Until the creator publishes, the playlist is 404: keep trying every few seconds.

const RETRY_MS = 2000;

async function loadHls() {
  try {
    const mod = await import("/static/dist/hls.mjs");
    return mod.default;
  } catch {
    return null; // not built (`npm run build` in web/) or blocked: try native HLS
  }
}

export function startPlayer(video, url, { onPlaying = () => {}, onStalled = () => {} } = {}) {
  let hls = null;
  let stopped = false;
  let retryTimer = null;
  const playing = () => onPlaying();
  video.addEventListener("playing", playing);

  const tryPlay = () => video.play().catch(() => {});

  function retry() {
    if (stopped) return;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(start, RETRY_MS);
  }

  async function start() {
    if (stopped) return;
    const Hls = await loadHls();
    if (Hls && Hls.isSupported()) {
      if (hls) hls.destroy();
      // No liveSyncDuration: with LL-HLS parts hls.js then plays PART-HOLD-BACK (3 parts,
      // 0.6 s) behind the live edge; a fixed 1.5 s put glass-to-viewer at ~1.7 s
      // (python -m benchmarks.ingest, docs/benchmarks.md).
      // hls.js refuses a max latency without a sync duration, so a player that fell
      // behind catches up by playing up to 1.5x instead of jumping.
      hls = new Hls({ lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5,
        manifestLoadingMaxRetry: 0, backBufferLength: 10 });
      hls.on(Hls.Events.MANIFEST_PARSED, tryPlay);
      hls.on(Hls.Events.ERROR, (_e, data) => {
        if (!data.fatal) return;
        onStalled(data);
        if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
          hls.recoverMediaError();
        } else {
          hls.destroy();
          hls = null;
          retry();
        }
      });
      hls.loadSource(url);
      hls.attachMedia(video);
      return;
    }
    if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.onerror = () => { onStalled(video.error); retry(); };
      video.src = url;
      tryPlay();
      return;
    }
    onStalled(new Error("this browser cannot play HLS"));
  }

  start();
  return {
    get engine() { return hls ? "hls.js" : "native"; },
    stop() {
      stopped = true;
      clearTimeout(retryTimer);
      video.removeEventListener("playing", playing);
      if (hls) hls.destroy();
    },
  };
}
