-- Staff accounts: names and last logins, invitations, password resets, and the
-- mail that carries their links. Tokens are only ever stored as SHA-256; they
-- are found by that digest (never unique-indexed without church_id, so Citus can
-- distribute these tables by church_id like every other tenant table).

ALTER TABLE staff_user ADD COLUMN name text NOT NULL DEFAULT '';
ALTER TABLE staff_user ADD COLUMN last_login_at timestamptz;
ALTER TABLE staff_user ADD COLUMN password_changed_at timestamptz;
CREATE INDEX staff_user_role ON staff_user (church_id, role);

CREATE TABLE staff_invitation (
    church_id         uuid NOT NULL REFERENCES church (id),
    id                uuid NOT NULL,
    email             text NOT NULL,
    role              text NOT NULL CHECK (role IN ('owner', 'admin', 'staff')),
    token_hash        bytea NOT NULL,
    invited_by        uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    accepted_at       timestamptz,
    accepted_user_id  uuid,
    revoked_at        timestamptz,
    PRIMARY KEY (church_id, id)
);
CREATE INDEX staff_invitation_token ON staff_invitation (token_hash);
CREATE INDEX staff_invitation_pending ON staff_invitation (church_id, lower(email))
    WHERE accepted_at IS NULL AND revoked_at IS NULL;

CREATE TABLE password_reset (
    church_id   uuid NOT NULL,
    id          uuid NOT NULL,
    user_id     uuid NOT NULL,
    token_hash  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    PRIMARY KEY (church_id, id),
    FOREIGN KEY (church_id, user_id) REFERENCES staff_user (church_id, id) ON DELETE CASCADE
);
CREATE INDEX password_reset_token ON password_reset (token_hash);
CREATE INDEX password_reset_user ON password_reset (church_id, user_id) WHERE used_at IS NULL;

-- Every mail the app sends. Without an SMTP server (development) the body is kept
-- here and `koinonia outbox` lists it (status 'stored'); mail that went out
-- through SMTP keeps only its envelope (status 'sent' or 'failed'), never the
-- body, which may carry a live reset or invitation token.
CREATE TABLE mail_outbox (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    recipient   text NOT NULL,
    subject     text NOT NULL,
    body        text,
    kind        text NOT NULL DEFAULT '',
    status      text NOT NULL CHECK (status IN ('stored', 'sent', 'failed')),
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE INDEX mail_outbox_recent ON mail_outbox (created_at DESC, id DESC);
CREATE INDEX mail_outbox_recipient ON mail_outbox (lower(recipient), created_at DESC);
