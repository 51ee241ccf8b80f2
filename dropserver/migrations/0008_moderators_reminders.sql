-- Moderators, pinned chat messages, the moderation audit, reminders and the host's
-- avatar (docs/topics/moderation.md).
--
-- creator_moderators: the user ids a creator appointed to moderate the chat of all
--   their drops (delete, mute, ban, slow mode, pin), never their sales. Cached per
--   process for a few seconds (realtime/moderators.py): a chat message never reads it.
-- chat_moderation becomes the moderation audit (who, what, when): besides the mutes,
--   bans and deletions it already held, it records unbans, slow mode, pins and
--   appointments. in_drop_id: the drop the action was taken in (a ban's drop_id stays
--   NULL: it covers every drop of the creator). seconds: slow mode's interval.
-- drop_reminders: who asked to be reminded of a scheduled drop, and for which start
--   each was handed to the outbound notification: soon_for (the starts_at of the
--   10-minutes-before reminder) and live_for (the live_at of the went-live one). The
--   reminder process claims a drop's due reminders with one UPDATE of these columns in
--   the transaction that hands them off, so each goes out once across every node and
--   process and survives restarts; a drop rescheduled after its reminder went out has a
--   new starts_at, so its reminded users are told again for the new time.
-- drop_reminder_notices: every hand-off (kind 'starting_soon' or 'live', how many
--   users, the payload): the console's "reminders sent" and the outbound log.
-- users.avatar_url: the host's picture on the viewer page (from the token's `picture`
--   claim or PATCH /v1/me).
CREATE TABLE IF NOT EXISTS creator_moderators (
    creator_id      TEXT NOT NULL REFERENCES users(id),
    user_id         TEXT NOT NULL,
    appointed_by    TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (creator_id, user_id)
);
CREATE INDEX IF NOT EXISTS creator_moderators_user_idx ON creator_moderators (user_id);

ALTER TABLE chat_moderation DROP CONSTRAINT IF EXISTS chat_moderation_action_check;
ALTER TABLE chat_moderation ADD CONSTRAINT chat_moderation_action_check
    CHECK (action IN ('mute', 'ban', 'delete', 'unban', 'slow', 'pin', 'unpin',
                      'appoint', 'dismiss'));
ALTER TABLE chat_moderation ADD COLUMN IF NOT EXISTS in_drop_id BIGINT REFERENCES drops(id);
ALTER TABLE chat_moderation ADD COLUMN IF NOT EXISTS seconds INT;
CREATE INDEX IF NOT EXISTS chat_moderation_drop_idx
    ON chat_moderation (in_drop_id, created_at);
CREATE INDEX IF NOT EXISTS chat_moderation_creator_idx
    ON chat_moderation (creator_id, created_at);

CREATE TABLE IF NOT EXISTS drop_reminders (
    drop_id         BIGINT NOT NULL REFERENCES drops(id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    soon_for        TIMESTAMPTZ,                 -- starts_at it was reminded for
    live_for        TIMESTAMPTZ,                 -- live_at it was reminded for
    PRIMARY KEY (drop_id, user_id)
);

CREATE TABLE IF NOT EXISTS drop_reminder_notices (
    id              BIGSERIAL PRIMARY KEY,
    drop_id         BIGINT NOT NULL REFERENCES drops(id) ON DELETE CASCADE,
    kind            TEXT NOT NULL CHECK (kind IN ('starting_soon', 'live')),
    starts_at       TIMESTAMPTZ NOT NULL,        -- the start (or go-live) it was for
    users           INT NOT NULL,
    payload         JSONB NOT NULL,
    sent_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS drop_reminder_notices_drop_idx
    ON drop_reminder_notices (drop_id, id);

ALTER TABLE users ADD COLUMN IF NOT EXISTS avatar_url TEXT NOT NULL DEFAULT '';
