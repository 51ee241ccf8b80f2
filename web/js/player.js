// The HLS player: hls.js (from npm, built into /static/dist/hls.mjs) where the
// browser has Media Source Extensions, the browser's own HLS otherwise (Safari, iOS).
//
// The page starts it only once the stream is live (viewer-state.js wantsPlayer), so
// the playlist exists: a page opened before the creator publishes requests nothing.
// One hls.js instance lives as long as the player: a network error retries the load
// on it, and a stream that ended and went live again reloads its playlist. Tearing
// hls.js down and creating another revoked the MediaSource's blob: URL while the
// video element could still be loading it (a console error in Chromium). For the
// same reason the replay of an ended drop is loaded on that same instance
// (`switchTo`), not on a new one.

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
  url = String(url);
  let hls = null;
  let native = false;
  let stopped = false;
  let retryTimer = null;
  const playing = () => onPlaying();
  video.addEventListener("playing", playing);

  const tryPlay = () => video.play().catch(() => {});

  function later(fn) {
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => { if (!stopped) fn(); }, RETRY_MS);
  }

  async function start() {
    const Hls = await loadHls();
    if (stopped) return;
    if (Hls && Hls.isSupported()) {
      // No liveSyncDuration: with LL-HLS parts hls.js then plays PART-HOLD-BACK (3 parts,
      // 0.6 s) behind the live edge; a fixed 1.5 s put glass-to-viewer at ~1.7 s
      // (python -m benchmarks.ingest, docs/benchmarks.md).
      // hls.js refuses a max latency without a sync duration, so a player that fell
      // behind catches up by playing up to 1.5x instead of jumping.
      // No metadata cues: the replay's EXT-X-DATERANGE moments come to the page as
      // JSON (GET /v1/drops/{id}/replay), and hls.js' cue track is a <track> with a
      // data: URL, which the page's Content-Security-Policy (media-src) refuses.
      hls = new Hls({ lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5,
        manifestLoadingMaxRetry: 2, backBufferLength: 10,
        enableDateRangeMetadataCues: false, enableID3MetadataCues: false,
        enableEmsgMetadataCues: false });
      hls.on(Hls.Events.MANIFEST_PARSED, tryPlay);
      // A seek asked while another playlist was being switched to waits for this one.
      hls.on(Hls.Events.LEVEL_LOADED, () => { switching = false; applySeek(); });
      hls.on(Hls.Events.ERROR, (_e, data) => {
        if (!data.fatal) return;
        onStalled(data);
        if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
          hls.recoverMediaError();
        } else if (data.type === Hls.ErrorTypes.NETWORK_ERROR) {
          // The same instance tries again: the playlist when it never loaded, else
          // the loading where it stopped.
          const manifest = !hls.levels || hls.levels.length === 0;
          later(() => (manifest ? hls.loadSource(url) : hls.startLoad()));
        } else {
          later(reload);
        }
      });
      hls.loadSource(url);
      hls.attachMedia(video);
      return;
    }
    if (video.canPlayType("application/vnd.apple.mpegurl")) {
      native = true;
      video.onerror = () => { onStalled(video.error); later(reload); };
      video.src = url;
      tryPlay();
      return;
    }
    onStalled(new Error("this browser cannot play HLS"));
  }

  /** Load the playlist again (the stream went live again after it had ended). */
  function reload() {
    if (stopped) return;
    if (hls) {
      hls.loadSource(url);
      hls.startLoad();
    } else if (native) {
      video.src = url;
      tryPlay();
    }
  }

  /** Where the video is to go once it can: a seek asked before the playlist loaded. */
  let pendingSeek = null;
  let switching = false;
  const applySeek = () => {
    if (pendingSeek === null || switching || video.readyState < 1) return;
    video.currentTime = pendingSeek;
    pendingSeek = null;
    tryPlay();
  };
  video.addEventListener("loadedmetadata", applySeek);

  start();
  return {
    get engine() { return hls ? "hls.js" : native ? "native" : "none"; },
    get url() { return url; },
    reload,
    /** Play another playlist (the replay, once the live ended) on the same player. */
    switchTo(next) {
      url = String(next);
      pendingSeek = null;
      switching = !!hls; // until hls.js has loaded the new playlist
      reload();
    },
    /** Go to `seconds` (at once, or as soon as the playlist is loaded) and play. */
    seek(seconds) {
      pendingSeek = Math.max(0, Number(seconds) || 0);
      applySeek();
    },
    stop() {
      stopped = true;
      clearTimeout(retryTimer);
      video.removeEventListener("playing", playing);
      video.removeEventListener("loadedmetadata", applySeek);
      if (hls) hls.destroy();
      hls = null;
    },
  };
}
