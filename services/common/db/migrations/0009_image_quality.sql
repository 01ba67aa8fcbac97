-- Measured quality per image (issue 19): the output's SSIM against its source, the quality
-- setting used (0: lossless PNG or the source's own bytes) and an outcome note such as
-- TARGET_NOT_MET. NULL for images done before this migration.
ALTER TABLE images
    ADD COLUMN ssim real,
    ADD COLUMN quality smallint,
    ADD COLUMN note text;

-- The request's mean SSIM without a scan of its images: the sum and the count of the SSIMs
-- recorded, moved in the same statement as the other counters.
ALTER TABLE requests
    ADD COLUMN ssim_sum double precision NOT NULL DEFAULT 0,
    ADD COLUMN ssim_count integer NOT NULL DEFAULT 0;
