-- The audience surface: branches and groups in use, member filters, the history
-- of every opt-in change, and message templates.

-- Member filters by branch (and the branch-delete check); groups of a branch.
CREATE INDEX member_branch ON member (church_id, branch_id) WHERE branch_id IS NOT NULL;
CREATE INDEX member_group_branch ON member_group (church_id, branch_id)
    WHERE branch_id IS NOT NULL;
-- Imports and the API match group and branch names case-insensitively.
CREATE INDEX member_group_name ON member_group (church_id, lower(name));
CREATE UNIQUE INDEX branch_name ON branch (church_id, lower(name));

-- Consent history: one row per opt state a member has been in, with its source
-- and time (keyword, staff, api, import, inbound). Written by a trigger so every
-- writer of member.opted_in (the API, imports, the STOP/START keyword handler)
-- is recorded without having to remember to. Erasing a member deletes its rows.
CREATE TABLE member_opt_event (
    church_id   uuid NOT NULL,
    member_id   uuid NOT NULL,
    id          bigint GENERATED ALWAYS AS IDENTITY,
    opted_in    boolean NOT NULL,
    source      text NOT NULL,
    changed_at  timestamptz NOT NULL,
    PRIMARY KEY (church_id, member_id, id),
    FOREIGN KEY (church_id, member_id) REFERENCES member (church_id, id) ON DELETE CASCADE
);

-- Statement-level, with transition tables, so a 500-row import batch costs one
-- INSERT ... SELECT rather than 500 trigger calls.
CREATE FUNCTION member_opt_event_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_opt_event (church_id, member_id, opted_in, source, changed_at)
    SELECT church_id, id, opted_in, opt_source, opt_changed_at FROM inserted;
    RETURN NULL;
END
$$;

CREATE FUNCTION member_opt_event_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO member_opt_event (church_id, member_id, opted_in, source, changed_at)
    SELECT n.church_id, n.id, n.opted_in, n.opt_source, n.opt_changed_at
    FROM updated n JOIN previous o ON o.church_id = n.church_id AND o.id = n.id
    WHERE n.deleted_at IS NULL
      AND (n.opted_in IS DISTINCT FROM o.opted_in
           OR n.opt_changed_at IS DISTINCT FROM o.opt_changed_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER member_opt_event_insert AFTER INSERT ON member
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION member_opt_event_inserted();
CREATE TRIGGER member_opt_event_update AFTER UPDATE ON member
    REFERENCING OLD TABLE AS previous NEW TABLE AS updated
    FOR EACH STATEMENT EXECUTE FUNCTION member_opt_event_updated();

-- Existing members start their history with the state they are in now.
INSERT INTO member_opt_event (church_id, member_id, opted_in, source, changed_at)
SELECT church_id, id, opted_in, opt_source, opt_changed_at FROM member WHERE deleted_at IS NULL;

CREATE TABLE message_template (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    name        text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE UNIQUE INDEX message_template_name ON message_template (church_id, lower(name));
