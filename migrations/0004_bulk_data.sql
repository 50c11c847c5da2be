-- Where each value served as a BulkDataURI (other than pixel data) lies in the stored object:
-- a JSON object, bulk path ("00420011", "00081115/0/00091001") -> {"offset", "length", "swap"}.
-- Rows indexed before it have '{}': their bulk data is found by parsing the object.
ALTER TABLE instances ADD COLUMN bulk_data TEXT NOT NULL DEFAULT '{}';
