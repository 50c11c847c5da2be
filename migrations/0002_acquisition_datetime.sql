-- AcquisitionDateTime (DT) for range matching, normalised like the other temporal columns
-- (YYYYMMDDHHMMSS.FFFFFF, in UTC when the value or the object gives an offset).
ALTER TABLE instances ADD COLUMN acquisition_datetime TEXT NOT NULL DEFAULT '';

-- Columns that rows indexed before they existed still lack: filled from the stored JSON when the
-- index opens (index::backfill), then the row here is removed.
CREATE TABLE backfill (what TEXT PRIMARY KEY);
INSERT INTO backfill (what) SELECT 'acquisition_datetime' WHERE EXISTS (SELECT 1 FROM instances);
