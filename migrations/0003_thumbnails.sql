-- Cached thumbnails (render::thumbnail), keyed by the stored copy they were rendered from and their
-- variant (media type, viewport, frame). A thumbnail is a function of that key, so gateways sharing
-- the index may render one concurrently: the first insert wins, the others are ignored.
CREATE TABLE thumbnails (
    storage_key TEXT NOT NULL,
    variant     TEXT NOT NULL,
    image       BLOB NOT NULL,
    PRIMARY KEY (storage_key, variant)
);
-- A thumbnail goes with the copy it shows: deleted with its instance row, or when the row is
-- pointed at another copy.
CREATE TRIGGER thumbnails_of_deleted_instances AFTER DELETE ON instances BEGIN
    DELETE FROM thumbnails WHERE storage_key = OLD.storage_key;
END;
CREATE TRIGGER thumbnails_of_replaced_copies AFTER UPDATE OF storage_key ON instances BEGIN
    DELETE FROM thumbnails WHERE storage_key = OLD.storage_key;
END;
