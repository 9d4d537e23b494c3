-- A schema built to be hard for a dump/restore round trip (tests/integration/test_fidelity.py).
--
-- Loaded by tests.fidelity.compare.load_schema into an empty database as a superuser; run once,
-- in two transactions (new enum values must be committed before use). Everything here is
-- deterministic (no random(), no now()), so that two loads produce the same snapshot and a
-- restored copy can be compared with its source object by object.
--
-- Traps, by section: data types at the edges of their ranges; text that breaks COPY's text
-- format; generated/identity columns; sequences at odd positions; partitioned, inherited and
-- unlogged tables; large objects with comments and ACLs; views and materialized views (one never
-- populated); SQL/plpgsql functions and triggers that would change the data if they fired during
-- the data load; forced row-level security; owners, grants and default privileges; comments;
-- quoted and unicode identifiers; contrib extensions when installed; a table with no rows and a
-- table with no columns (but rows); a dropped column; a table big enough for many COPY chunks.

SET client_min_messages = warning;
SET standard_conforming_strings = on;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';

BEGIN;

-- Roles are cluster-wide: create them only once per cluster.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgk_fid_owner') THEN
        CREATE ROLE pgk_fid_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgk_fid_reader') THEN
        CREATE ROLE pgk_fid_reader NOLOGIN;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Schemas
------------------------------------------------------------------------------------------------
CREATE SCHEMA fid;
COMMENT ON SCHEMA fid IS 'fidelity: the main schema (not public)';
CREATE SCHEMA "Ünï Schema" AUTHORIZATION pgk_fid_owner;
COMMENT ON SCHEMA "Ünï Schema" IS 'a quoted, unicode schema owned by another role';
GRANT USAGE ON SCHEMA fid TO pgk_fid_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA fid GRANT SELECT ON TABLES TO pgk_fid_reader;

------------------------------------------------------------------------------------------------
-- Extensions from core contrib, only when installed on this server
------------------------------------------------------------------------------------------------
DO $$
DECLARE
    ext text;
BEGIN
    FOREACH ext IN ARRAY ARRAY['hstore', 'citext', 'pg_trgm'] LOOP
        IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = ext) THEN
            EXECUTE format('CREATE EXTENSION IF NOT EXISTS %I WITH SCHEMA public', ext);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hstore')
       AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citext') THEN
        CREATE TABLE fid.ext_values (
            id int PRIMARY KEY,
            h public.hstore,
            c public.citext UNIQUE
        );
        INSERT INTO fid.ext_values VALUES
            (1, 'a=>1, "b c"=>"x\"y", n=>NULL', 'MiXeD Case'),
            (2, '', 'ümlaut'),
            (3, NULL, NULL);
        COMMENT ON TABLE fid.ext_values IS 'columns of contrib types (hstore, citext)';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') THEN
        CREATE TABLE fid.trgm_docs (id int PRIMARY KEY, body text NOT NULL);
        INSERT INTO fid.trgm_docs SELECT g, 'document number ' || g FROM generate_series(1, 50) g;
        CREATE INDEX trgm_docs_body_trgm ON fid.trgm_docs USING gin (body public.gin_trgm_ops);
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Types: enum, domains, composite, ranges
------------------------------------------------------------------------------------------------
CREATE TYPE fid.mood AS ENUM ('sad', 'ok', 'happy');
-- A value added out of order: its sort order is fractional in the catalog.
ALTER TYPE fid.mood ADD VALUE 'meh' BEFORE 'ok';
ALTER TYPE fid.mood ADD VALUE 'ecstatic' AFTER 'happy';
COMMENT ON TYPE fid.mood IS 'an enum with values added BEFORE/AFTER';
-- Enum values added by ALTER TYPE can only be used once committed.
COMMIT;
BEGIN;

CREATE DOMAIN fid.positive_int AS integer CONSTRAINT positive CHECK (VALUE > 0);
CREATE DOMAIN fid.email AS text
    CONSTRAINT has_at CHECK (VALUE ~ '^[^@]+@[^@]+$')
    CONSTRAINT not_too_long CHECK (length(VALUE) <= 254);
CREATE DOMAIN fid.nonempty_text AS text NOT NULL DEFAULT 'n/a' CHECK (VALUE <> '');
COMMENT ON DOMAIN fid.email IS 'a domain with two named checks';

CREATE TYPE fid.complex AS (r double precision, i double precision);
CREATE TYPE fid.address AS (street text, city text, zip varchar(10), location fid.complex);
COMMENT ON TYPE fid.address IS 'a composite type nesting another one';
COMMENT ON COLUMN fid.address.zip IS 'column of a composite type';

CREATE TYPE fid.floatrange AS RANGE (subtype = double precision, subtype_diff = float8mi);

------------------------------------------------------------------------------------------------
-- Functions (SQL, SQL-standard body, plpgsql), a procedure, an aggregate
------------------------------------------------------------------------------------------------
CREATE FUNCTION fid.add_tax(amount numeric, rate numeric DEFAULT 0.2) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN round(amount * (1 + rate), 2);
COMMENT ON FUNCTION fid.add_tax(numeric, numeric) IS 'SQL-standard body with a default argument';

CREATE FUNCTION fid.full_name(first text, last text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT initcap($1) || ' ' || upper($2) $$;

CREATE FUNCTION fid.mood_score(m fid.mood) RETURNS integer
    LANGUAGE plpgsql IMMUTABLE
    AS $body$
DECLARE
    score integer;
BEGIN
    -- Tabs	and 'quotes' and $dollars$ inside a function body.
    CASE m
        WHEN 'sad' THEN score := -2;
        WHEN 'meh' THEN score := -1;
        WHEN 'ok' THEN score := 0;
        WHEN 'happy' THEN score := 1;
        ELSE score := 2;
    END CASE;
    RETURN score;
END
$body$;
COMMENT ON FUNCTION fid.mood_score(fid.mood) IS 'plpgsql with a CASE over an enum';

CREATE FUNCTION fid.set_search_path_demo() RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = fid, pg_temp
    AS $$ SELECT current_setting('search_path') $$;

CREATE PROCEDURE fid.bump_counter(n integer)
    LANGUAGE plpgsql
    AS $$ BEGIN UPDATE fid.counters SET value = value + n; END $$;
COMMENT ON PROCEDURE fid.bump_counter(integer) IS 'a procedure';

CREATE AGGREGATE fid.text_concat(text) (sfunc = textcat, stype = text, initcond = '');
COMMENT ON AGGREGATE fid.text_concat(text) IS 'a user aggregate';

------------------------------------------------------------------------------------------------
-- The type zoo: one column per hard type, a few crafted rows each
------------------------------------------------------------------------------------------------
CREATE TABLE fid.type_zoo (
    id integer PRIMARY KEY,
    c_bool boolean,
    c_int2 smallint,
    c_int4 integer,
    c_int8 bigint,
    c_numeric numeric,
    c_numeric_scaled numeric(1000, 500),
    c_float4 real,
    c_float8 double precision,
    c_money money,
    c_char char(5),
    c_varchar varchar(20),
    c_text text,
    c_name name,
    c_qchar "char",
    c_bytea bytea,
    c_json json,
    c_jsonb jsonb,
    c_xml xml,
    c_uuid uuid,
    c_inet inet,
    c_cidr cidr,
    c_macaddr macaddr,
    c_macaddr8 macaddr8,
    c_bit bit(8),
    c_varbit bit varying(64),
    c_tsvector tsvector,
    c_tsquery tsquery,
    c_date date,
    c_time time,
    c_timetz time with time zone,
    c_timestamp timestamp,
    c_timestamptz timestamp with time zone,
    c_interval interval,
    c_point point,
    c_line line,
    c_lseg lseg,
    c_box box,
    c_path path,
    c_polygon polygon,
    c_circle circle,
    c_int4range int4range,
    c_numrange numrange,
    c_tstzrange tstzrange,
    c_daterange daterange,
    c_floatrange fid.floatrange,
    c_int4multirange int4multirange,
    c_datemultirange datemultirange,
    c_mood fid.mood,
    c_email fid.email,
    c_positive fid.positive_int,
    c_complex fid.complex,
    c_address fid.address,
    c_int_arr integer[],
    c_int_arr2d integer[][],
    c_text_arr text[],
    c_mood_arr fid.mood[],
    c_range_arr int4range[],
    c_complex_arr fid.complex[],
    c_jsonb_arr jsonb[],
    c_regclass regclass,
    c_regtype regtype,
    c_pg_lsn pg_lsn,
    c_oid oid
);
COMMENT ON TABLE fid.type_zoo IS 'one column per hard type; rows at the edges of each range';
COMMENT ON COLUMN fid.type_zoo.c_bytea IS 'zero bytes, high bytes, empty';

-- Row 1: the everyday values.
INSERT INTO fid.type_zoo VALUES (
    1, true, 1, 2, 3, 12.345, 1.5, 1.5, 2.25, 12.34, 'ab', 'varchar', 'plain text', 'a_name', 'x',
    '\x00ff00', '{"a": 1}', '{"a": 1}', '<a>1</a>', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'10101010',
    B'101', 'a fat cat sat on a mat', 'fat & (rat | cat)', '2024-02-29', '12:34:56.789',
    '12:34:56+05:30', '2024-02-29 12:34:56.123456', '2024-02-29 12:34:56.123456+00', '1 day 2 hours',
    '(1,2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))',
    '<(0,0),1>', '[1,10)', '(1.5,2.5]', '[2024-01-01 00:00+00,2024-12-31 00:00+00)', '[2024-01-01,2024-02-01)',
    '[0.5,1.5)', '{[1,3),[5,7)}', '{[2024-01-01,2024-01-05),[2024-02-01,2024-02-03)}', 'happy',
    'a@b.example', 7, '(1,-1)', '("1 Main St","Springfield",12345,"(0.5,0.25)")', '{1,2,3}',
    '{{1,2},{3,4}}', '{a,b,c}', '{sad,meh,ecstatic}', '{"[1,2)","[3,4)"}', '{"(1,2)","(3,4)"}',
    ARRAY['{"k": [1, 2]}'::jsonb, 'null'::jsonb], 'fid.type_zoo', 'fid.address', '16/B374D848', 4242
);

-- Row 2: the edges of every range, the special values, the traps in every text format.
INSERT INTO fid.type_zoo VALUES (
    2, false, -32768, -2147483648, -9223372036854775808,
    'NaN',
    -- 500 digits before and after the decimal point.
    (repeat('9', 500) || '.' || repeat('0', 499) || '1')::numeric,
    '-0', '-0', '-92233720368547758.08',
    'a', '', E'tab\there', repeat('n', 63), E'\\',
    '\x', '{"a":1,  "a" : 2 ,"b":[1,2  ,3]}  ', '{"deep": {"deeper": {"deepest": [null, true, 1e400]}}, "u": "\u00e9\ud83d\ude00"}',
    '<?xml version="1.0"?><doc  attr="x"><!-- c --><![CDATA[ <raw> ]]>  </doc>',
    '00000000-0000-0000-0000-000000000000',
    '::ffff:1.2.3.4/128', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff:ff:ff', B'00000000',
    B'', '', '!a & b', '4713-01-01 BC', '24:00:00', '00:00:00+1459', '4713-01-01 00:00:00 BC',
    '4713-01-01 00:00:00+00 BC', '-178000000 years', '(-0,NaN)', '{0,1,-1e300}', '[(-1e308,1e308),(0,0)]',
    '(0,0),(0,0)', '((0,0))', '((0,0),(0,0),(0,0))', '<(0,0),0>', 'empty', '(,)',
    '(,infinity)', '[-infinity,infinity]', '(-infinity,-1e-300]', '{}', '{[2000-01-01,2000-01-02)}',
    'sad', 'x@y', 2147483647, '(Infinity,-Infinity)', '(,,,)', '{}', '[0:1][-1:0]={{1,NULL},{NULL,4}}',
    '{NULL,"NULL","",\\N,"a,b","c\"d","e\\f"," spaced "}', '{}', '{empty,"(,)"}', '{NULL,"(,)"}', '{}',
    'pg_catalog.pg_class', 'double precision[]', '0/0', 0
);

-- Row 3: the other edges (max values, infinities, NaN in floats and numerics, huge json).
INSERT INTO fid.type_zoo VALUES (
    3, NULL, 32767, 2147483647, 9223372036854775807,
    'Infinity', ('-0.' || repeat('0', 499) || '1')::numeric, 'Infinity', '-Infinity',
    '92233720368547758.07',
    '     ', repeat('z', 20), E'cr\rlf\r\nnl\nend', '', '\377',
    decode(repeat('00', 1000) || 'deadbeef' || repeat('ff', 1000), 'hex'),
    '[]', '[]', '<!-- just a comment -->', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
    '255.255.255.255', '0.0.0.0/0', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00', B'11111111',
    repeat('1', 64)::varbit, 'ab:1A,2B cd:3 ''quo te'':4C', '''x'' <-> y', '5874897-12-31', '00:00:00', '23:59:59.999999-1459',
    '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00', '178000000 years -1 us',
    '(1e-320,1.7976931348623157e308)', '{1,0,0}', '[(1,2),(3,4)]', '(1e300,1e300),(-1e300,-1e300)',
    '((0,0),(1,0),(1,1))', '((1,2),(3,4),(5,6),(7,8))', '<(1,1),1e300>', '[-2147483648,2147483647)',
    '(-1e400,1e400)', '[infinity,infinity]', 'empty', 'empty', '{[-2147483648,-2147483647),[2147483646,2147483647)}',
    '{(-infinity,infinity)}', 'ecstatic', 'x@y.z', 1, '(NaN,-0)', NULL, '{NULL}', '{{NULL,NULL},{NULL,NULL}}',
    '{"\\.","\n"}', '{NULL}', '{"[1,2)",NULL,empty}', '{"(,)"}', '{NULL,"\"x\""}',
    NULL, NULL, 'FFFFFFFF/FFFFFFFF', 4294967295
);

-- Row 4: infinities in every date/time type that has them, NaN floats, -0 in ranges.
INSERT INTO fid.type_zoo (id, c_float4, c_float8, c_numeric, c_date, c_timestamp, c_timestamptz,
                          c_daterange, c_tstzrange, c_numrange, c_text)
VALUES (4, 'NaN', 'NaN', '-0.000', 'infinity', 'infinity', '-infinity',
        '[-infinity,infinity)', '(-infinity,infinity)', '(-Infinity,Infinity)', 'four'),
       (5, '1e-45', '5e-324', '0.0000000000000000000000000000000000000000000000000000000000001',
        '-infinity', '-infinity', 'infinity', '[4714-11-24 BC,2000-01-01)', NULL, '[0,0]', 'five'),
       (6, 3.4028235e38, 2.2250738585072014e-308, '-1e-130', '4714-11-24 BC', '4714-11-24 00:00:00 BC',
        '4714-11-24 00:00:00+00 BC', NULL, NULL, NULL, NULL);

-- Row 7: all NULLs.
INSERT INTO fid.type_zoo (id) VALUES (7);

------------------------------------------------------------------------------------------------
-- Text that breaks COPY's text format and plain SQL scripts
------------------------------------------------------------------------------------------------
CREATE TABLE fid.copy_edge (v text);
COMMENT ON TABLE fid.copy_edge IS 'one text column; a row holding only \. ends a COPY in a script';
INSERT INTO fid.copy_edge (v) VALUES
    ('\.'),
    (E'\\.\n'),
    (E'first line\n\\.\nlast line'),
    (E'\\.\r\n'),
    ('\N'),
    ('NULL'),
    (NULL),
    (''),
    (E'\t'),
    (E'\n'),
    (E'\r'),
    (E'\\'),
    (E'\\\\'),
    (E'a\tb\nc\rd\\e'),
    (E'\b\f\v'),
    (E'\x01\x02\x1f\x7f'),
    (' leading and trailing spaces '),
    (E'COPY fid.copy_edge (v) FROM stdin;\n\\.\n'),
    ('-- not a comment; /* nor this */ $$ nor $tag$ a dollar quote'),
    ('ünïcødé ☃ 😀 ‮rtl‬ e' || chr(769) || ' zero' || chr(8203) || 'width ' || chr(65279) || 'bom ' || chr(8232) || 'ls'),
    (repeat('long line ', 30000));

------------------------------------------------------------------------------------------------
-- Generated and identity columns; a dropped column; triggers that must not fire on restore
------------------------------------------------------------------------------------------------
CREATE TABLE fid.counters (name text PRIMARY KEY, value bigint NOT NULL DEFAULT 0);
INSERT INTO fid.counters VALUES ('orders', 0), ('audit', 0);

CREATE TABLE fid.orders (
    id bigint GENERATED ALWAYS AS IDENTITY (START WITH 1000 INCREMENT BY 7) PRIMARY KEY,
    ext_ref integer GENERATED BY DEFAULT AS IDENTITY (MINVALUE -100 START WITH -100 INCREMENT BY -3 MAXVALUE 0 CYCLE),
    customer text NOT NULL,
    qty integer NOT NULL CHECK (qty > 0),
    price numeric(12, 2) NOT NULL,
    gone text,
    total numeric GENERATED ALWAYS AS (fid.add_tax(qty * price)) STORED,
    label text GENERATED ALWAYS AS (upper(customer) || ' x' || qty) STORED,
    mood fid.mood DEFAULT 'ok',
    note fid.nonempty_text,
    created date NOT NULL DEFAULT '2024-01-01'
);
COMMENT ON COLUMN fid.orders.total IS 'generated (stored) from a function';
COMMENT ON COLUMN fid.orders.id IS 'identity, always, odd start and increment';

CREATE TABLE fid.audit (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    order_id bigint,
    action text NOT NULL
);

CREATE FUNCTION fid.orders_before() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    -- If this fired during a restore's data load, every note would gain a second suffix.
    NEW.note := NEW.note || ' [seen by trigger]';
    RETURN NEW;
END
$$;

CREATE FUNCTION fid.orders_after() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO fid.audit (order_id, action) VALUES (NEW.id, TG_OP);
    UPDATE fid.counters SET value = value + 1 WHERE name = 'audit';
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION fid.orders_after() IS 'writes to fid.audit: a restore that fires it doubles audit';

CREATE FUNCTION fid.orders_stmt() RETURNS trigger
    LANGUAGE plpgsql
    AS $$ BEGIN UPDATE fid.counters SET value = value + 1 WHERE name = 'orders'; RETURN NULL; END $$;

CREATE TRIGGER orders_before BEFORE INSERT OR UPDATE ON fid.orders
    FOR EACH ROW EXECUTE FUNCTION fid.orders_before();
CREATE TRIGGER orders_after AFTER INSERT ON fid.orders
    FOR EACH ROW WHEN (NEW.qty > 1) EXECUTE FUNCTION fid.orders_after();
CREATE TRIGGER orders_stmt AFTER INSERT ON fid.orders
    FOR EACH STATEMENT EXECUTE FUNCTION fid.orders_stmt();
CREATE TRIGGER orders_disabled BEFORE DELETE ON fid.orders
    FOR EACH ROW EXECUTE FUNCTION fid.orders_before();
CREATE CONSTRAINT TRIGGER orders_deferred AFTER UPDATE ON fid.orders
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fid.orders_after();
COMMENT ON TRIGGER orders_before ON fid.orders IS 'must not fire while data is restored';

INSERT INTO fid.orders (customer, qty, price, note, mood)
SELECT 'customer ' || g, 1 + g % 5, (g * 1.37)::numeric(12, 2), 'note ' || g,
       (ARRAY['sad', 'meh', 'ok', 'happy', 'ecstatic']::fid.mood[])[1 + g % 5]
FROM generate_series(1, 40) g;
INSERT INTO fid.orders (ext_ref, customer, qty, price, note) VALUES (500, 'explicit ext_ref', 1, 1, 'x');
ALTER TABLE fid.orders DROP COLUMN gone;
ALTER TABLE fid.orders ADD COLUMN added_later text DEFAULT 'added after a drop';
ALTER TABLE fid.orders DISABLE TRIGGER orders_disabled;
ALTER TABLE fid.orders ENABLE REPLICA TRIGGER orders_stmt;

------------------------------------------------------------------------------------------------
-- Sequences at odd positions
------------------------------------------------------------------------------------------------
CREATE SEQUENCE fid.seq_huge;
SELECT setval('fid.seq_huge', 9223372036854775000);
CREATE SEQUENCE fid.seq_negative INCREMENT BY -3 MINVALUE -1000000 MAXVALUE -1 START WITH -1;
SELECT setval('fid.seq_negative', -999999);
CREATE SEQUENCE fid.seq_not_called;
SELECT setval('fid.seq_not_called', 42, false);
CREATE SEQUENCE fid.seq_cycle AS smallint INCREMENT BY 4 MINVALUE 1 MAXVALUE 10 CYCLE CACHE 3;
SELECT nextval('fid.seq_cycle') FROM generate_series(1, 4);
CREATE SEQUENCE fid.seq_untouched START WITH 77;
CREATE SEQUENCE fid."Seq ünï" AS integer START WITH -5 MINVALUE -5 INCREMENT BY 1;
SELECT nextval('fid."Seq ünï"');
COMMENT ON SEQUENCE fid.seq_huge IS 'last_value near bigint max';

CREATE TABLE fid.serials (
    id serial PRIMARY KEY,
    big bigserial,
    small smallserial,
    v text
);
INSERT INTO fid.serials (v) SELECT 'serial ' || g FROM generate_series(1, 10) g;
SELECT setval(pg_get_serial_sequence('fid.serials', 'big'), 1000000, false);

------------------------------------------------------------------------------------------------
-- Partitioned tables: range (with default and a sub-partitioned child), list (with default), hash
------------------------------------------------------------------------------------------------
CREATE TABLE fid.measurements (
    id bigint NOT NULL,
    taken date NOT NULL,
    sensor integer NOT NULL,
    value double precision,
    PRIMARY KEY (id, taken, sensor)
) PARTITION BY RANGE (taken);
COMMENT ON TABLE fid.measurements IS 'range partitioned, with a default partition';
CREATE TABLE fid.measurements_2023 PARTITION OF fid.measurements
    FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE fid.measurements_2024 PARTITION OF fid.measurements
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
    PARTITION BY HASH (sensor);
CREATE TABLE fid.measurements_2024_h0 PARTITION OF fid.measurements_2024
    FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE fid.measurements_2024_h1 PARTITION OF fid.measurements_2024
    FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE fid.measurements_default PARTITION OF fid.measurements DEFAULT;
CREATE TABLE fid.measurements_ancient PARTITION OF fid.measurements
    FOR VALUES FROM (MINVALUE) TO ('1000-01-01');
COMMENT ON TABLE fid.measurements_default IS 'the default partition';
CREATE INDEX measurements_sensor_idx ON fid.measurements (sensor, taken DESC);
INSERT INTO fid.measurements
SELECT g, date '2022-12-01' + (g % 800), g % 13, g / 7.0 FROM generate_series(1, 1500) g;
INSERT INTO fid.measurements VALUES (0, '4713-01-01 BC', 0, '-Infinity');

CREATE TABLE fid.regions (
    code text NOT NULL,
    name text,
    population bigint
) PARTITION BY LIST (code);
CREATE TABLE fid.regions_eu PARTITION OF fid.regions FOR VALUES IN ('de', 'fr', 'it');
CREATE TABLE fid.regions_null PARTITION OF fid.regions FOR VALUES IN ('');
CREATE TABLE fid.regions_other PARTITION OF fid.regions DEFAULT;
INSERT INTO fid.regions VALUES ('de', 'Deutschland', 83000000), ('fr', 'France', 68000000),
    ('', 'empty code', 0), ('jp', 'Japan', 125000000), ('us', 'USA', NULL);

------------------------------------------------------------------------------------------------
-- Inheritance (a parent with rows of its own, two children, one with two parents)
------------------------------------------------------------------------------------------------
CREATE TABLE fid.cities (name text NOT NULL, population integer, elevation integer);
CREATE TABLE fid.tagged (tag text DEFAULT 'tagged');
CREATE TABLE fid.capitals (state char(2) NOT NULL) INHERITS (fid.cities);
CREATE TABLE fid.tagged_capitals () INHERITS (fid.capitals, fid.tagged);
INSERT INTO fid.cities VALUES ('Las Vegas', 641903, 2001), ('Mariposa', 1200, 1953);
INSERT INTO fid.capitals VALUES ('Sacramento', 524943, 30, 'CA'), ('Madison', 269840, 845, 'WI');
INSERT INTO fid.tagged_capitals VALUES ('Austin', 961855, 489, 'TX', 'lone star');
COMMENT ON TABLE fid.capitals IS 'inherits cities';

------------------------------------------------------------------------------------------------
-- Unlogged table, a table with no rows, a table with no columns (but rows), a wide-ish big table
------------------------------------------------------------------------------------------------
CREATE UNLOGGED TABLE fid.cache (k text PRIMARY KEY, v jsonb) WITH (fillfactor = 70);
INSERT INTO fid.cache SELECT 'key' || g, jsonb_build_object('g', g, 's', repeat('x', g % 17))
FROM generate_series(1, 100) g;
COMMENT ON TABLE fid.cache IS 'unlogged, with a storage parameter';

CREATE TABLE fid.empty (id integer PRIMARY KEY, v text);
COMMENT ON TABLE fid.empty IS 'a table with no rows';

CREATE TABLE fid.no_columns ();
INSERT INTO fid.no_columns DEFAULT VALUES;
INSERT INTO fid.no_columns DEFAULT VALUES;
INSERT INTO fid.no_columns DEFAULT VALUES;
COMMENT ON TABLE fid.no_columns IS 'zero columns but three rows';

-- Big enough that the dump stream spans many read buffers; TOASTed values included.
CREATE TABLE fid.events (
    id bigint PRIMARY KEY,
    occurred timestamptz NOT NULL,
    kind text NOT NULL,
    payload jsonb,
    body text,
    score numeric(20, 10),
    flags boolean[],
    blob bytea
) WITH (autovacuum_enabled = false, toast_tuple_target = 256);
ALTER TABLE fid.events ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE fid.events REPLICA IDENTITY FULL;
INSERT INTO fid.events
SELECT g,
       timestamptz '2020-01-01 00:00:00+00' + g * interval '37 seconds 123 microseconds',
       (ARRAY['click', 'view', 'buy', E'odd\tkind', E'multi\nline'])[1 + g % 5],
       jsonb_build_object('g', g, 'sq', g * g, 'tags', jsonb_build_array('t' || g % 7, g % 3 = 0),
                          'text', md5(g::text)),
       CASE WHEN g % 500 = 0 THEN repeat(md5(g::text), 200)
            WHEN g % 97 = 0 THEN E'back\\slash \\. and\nnewline'
            ELSE 'event ' || g || ' ' || md5(g::text) END,
       (g * 3.14159265358979)::numeric(20, 10),
       ARRAY[g % 2 = 0, NULL, g % 3 = 0],
       CASE WHEN g % 10 = 0 THEN decode(md5(g::text) || '00', 'hex') END
FROM generate_series(1, 20000) g;
CREATE INDEX events_kind_occurred ON fid.events (kind, occurred);
CREATE INDEX events_payload_gin ON fid.events USING gin (payload jsonb_path_ops);
CREATE INDEX events_recent ON fid.events (occurred) WHERE id > 19000;
CREATE INDEX events_lower_kind ON fid.events (lower(kind));
CREATE INDEX events_brin ON fid.events USING brin (occurred);
ALTER TABLE fid.events CLUSTER ON events_kind_occurred;
COMMENT ON INDEX fid.events_recent IS 'a partial index';
CREATE STATISTICS fid.events_stats (dependencies) ON kind, score FROM fid.events;

------------------------------------------------------------------------------------------------
-- Constraints: FKs (self-referencing, circular, deferrable), exclusion, NOT VALID check
------------------------------------------------------------------------------------------------
CREATE TABLE fid.employees (
    id integer PRIMARY KEY,
    manager_id integer REFERENCES fid.employees (id) ON DELETE SET NULL,
    dept_id integer,
    name text NOT NULL COLLATE "C",
    email fid.email UNIQUE
);
CREATE TABLE fid.departments (
    id integer PRIMARY KEY,
    head_id integer REFERENCES fid.employees (id) DEFERRABLE INITIALLY DEFERRED,
    name text NOT NULL
);
ALTER TABLE fid.employees ADD CONSTRAINT employees_dept_fk FOREIGN KEY (dept_id)
    REFERENCES fid.departments (id) DEFERRABLE INITIALLY DEFERRED;
SET CONSTRAINTS ALL DEFERRED;
-- Children before parents: only loadable because the FKs are checked at commit.
INSERT INTO fid.employees VALUES (3, 2, 10, 'carol', 'carol@example.com'),
    (2, 1, 10, 'bob', 'bob@example.com'), (1, NULL, 10, 'alice', 'alice@example.com');
INSERT INTO fid.departments VALUES (10, 1, 'engineering');
INSERT INTO fid.employees VALUES (4, 4, NULL, 'self-managed', NULL);
COMMENT ON CONSTRAINT employees_dept_fk ON fid.employees IS 'circular, deferrable';

CREATE TABLE fid.bookings (
    room integer NOT NULL,
    during tsrange NOT NULL,
    EXCLUDE USING gist (during WITH &&) WHERE (room > 0)
);
INSERT INTO fid.bookings VALUES (1, '[2024-01-01 10:00,2024-01-01 11:00)'),
    (2, '[2024-01-01 11:00,2024-01-01 12:00)'), (0, '[2024-01-01 10:00,2024-01-01 11:00)');
-- Rows that violate a check added later as NOT VALID: a restore must keep them.
CREATE TABLE fid.legacy (id integer PRIMARY KEY, amount integer);
INSERT INTO fid.legacy VALUES (1, -5), (2, 10);
ALTER TABLE fid.legacy ADD CONSTRAINT amount_positive CHECK (amount > 0) NOT VALID;

------------------------------------------------------------------------------------------------
-- Views and materialized views
------------------------------------------------------------------------------------------------
CREATE VIEW fid.order_summary AS
    SELECT customer, count(*) AS n, sum(total) AS total, fid.text_concat(label) AS labels
    FROM fid.orders GROUP BY customer;
COMMENT ON VIEW fid.order_summary IS 'a view over a generated column and a user aggregate';
COMMENT ON COLUMN fid.order_summary.n IS 'a comment on a view column';

CREATE VIEW fid.big_orders WITH (security_barrier = true, check_option = cascaded) AS
    SELECT * FROM fid.orders WHERE qty >= 3;

CREATE VIEW fid.invoker_view WITH (security_invoker = true) AS SELECT name FROM fid.cities;

CREATE RECURSIVE VIEW fid.org_chart (id, name, depth) AS
    SELECT id, name, 0 FROM fid.employees WHERE manager_id IS NULL
    UNION ALL
    SELECT e.id, e.name, o.depth + 1 FROM fid.employees e JOIN org_chart o ON e.manager_id = o.id AND e.id <> o.id;

CREATE MATERIALIZED VIEW fid.daily_events AS
    SELECT occurred::date AS day, kind, count(*) AS n, sum(score) AS score
    FROM fid.events GROUP BY 1, 2
    WITH DATA;
CREATE UNIQUE INDEX daily_events_key ON fid.daily_events (day, kind);
COMMENT ON MATERIALIZED VIEW fid.daily_events IS 'populated materialized view';

CREATE MATERIALIZED VIEW fid.never_populated AS SELECT id FROM fid.orders WITH NO DATA;
COMMENT ON MATERIALIZED VIEW fid.never_populated IS 'must stay unpopulated after a restore';

------------------------------------------------------------------------------------------------
-- Row-level security (enabled and forced), owners, grants
------------------------------------------------------------------------------------------------
CREATE TABLE fid.secrets (
    id integer PRIMARY KEY,
    owner_name text NOT NULL,
    secret text
);
INSERT INTO fid.secrets VALUES (1, 'pgk_fid_reader', 'visible to the reader'),
    (2, 'someone_else', 'hidden from the reader'), (3, 'pgk_fid_owner', E'owner''s \\ secret');
ALTER TABLE fid.secrets OWNER TO pgk_fid_owner;
ALTER TABLE fid.secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE fid.secrets FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON fid.secrets FOR SELECT TO pgk_fid_reader
    USING (owner_name = current_user);
CREATE POLICY owner_all ON fid.secrets AS PERMISSIVE FOR ALL TO pgk_fid_owner
    USING (true) WITH CHECK (owner_name <> '');
CREATE POLICY no_empty ON fid.secrets AS RESTRICTIVE FOR INSERT
    WITH CHECK (secret IS NOT NULL);
COMMENT ON POLICY own_rows ON fid.secrets IS 'readers see their own rows';
GRANT SELECT ON fid.secrets TO pgk_fid_reader;
GRANT SELECT (id, customer), UPDATE (note) ON fid.orders TO pgk_fid_reader;
GRANT USAGE ON SEQUENCE fid.seq_huge TO pgk_fid_reader;
GRANT EXECUTE ON FUNCTION fid.mood_score(fid.mood) TO pgk_fid_reader;
REVOKE EXECUTE ON FUNCTION fid.set_search_path_demo() FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- Quoted and unicode identifiers (in public and in a quoted schema)
------------------------------------------------------------------------------------------------
CREATE TABLE public."Weird Table" (
    "Mixed Case" integer PRIMARY KEY,
    "select" text,
    "from" text DEFAULT 'from',
    "with ""quotes""" text,
    "naïve ☃" text,
    " " text,
    "1st" integer
);
INSERT INTO public."Weird Table" VALUES
    (1, 'select', 'where', 'say "hi"', 'snow ☃', 'space', 1),
    (2, ';DROP TABLE x;--', NULL, '""', '', ' ', NULL);
COMMENT ON TABLE public."Weird Table" IS 'quoted identifiers in public';
COMMENT ON COLUMN public."Weird Table"."with ""quotes""" IS 'a column name with quotes';

CREATE TABLE public."select" ("table" text, "order" integer);
INSERT INTO public."select" VALUES ('reserved', 1);

CREATE TABLE "Ünï Schema"."ünïcødé" (
    "ключ" integer PRIMARY KEY,
    "値" text,
    "😀" jsonb
);
ALTER TABLE "Ünï Schema"."ünïcødé" OWNER TO pgk_fid_owner;
INSERT INTO "Ünï Schema"."ünïcødé" VALUES (1, 'значение', '{"ключ": "値"}'), (2, E'\\.', NULL);
COMMENT ON TABLE "Ünï Schema"."ünïcødé" IS 'ünïcødé cömment ☃';

CREATE SEQUENCE "Ünï Schema"."séquence" START WITH 100;
SELECT nextval('"Ünï Schema"."séquence"');
ALTER SEQUENCE "Ünï Schema"."séquence" OWNER TO pgk_fid_owner;
ALTER SEQUENCE "Ünï Schema"."séquence" OWNED BY "Ünï Schema"."ünïcødé"."ключ";

------------------------------------------------------------------------------------------------
-- Large objects: server-assigned and fixed oids, empty, multi-page, commented, granted
------------------------------------------------------------------------------------------------
SELECT lo_from_bytea(0, '\x00010203ff00'::bytea);
SELECT lo_from_bytea(424242, convert_to(repeat('large object text ', 5000), 'UTF8'));
SELECT lo_from_bytea(424243, ''::bytea);
SELECT lo_from_bytea(424244, decode(string_agg(md5(g::text), ''), 'hex'))
FROM generate_series(1, 4000) g;
COMMENT ON LARGE OBJECT 424242 IS 'a multi-page large object';
COMMENT ON LARGE OBJECT 424243 IS 'an empty large object';
ALTER LARGE OBJECT 424244 OWNER TO pgk_fid_owner;
GRANT SELECT ON LARGE OBJECT 424242 TO pgk_fid_reader;
CREATE TABLE fid.documents (id integer PRIMARY KEY, content oid);
INSERT INTO fid.documents VALUES (1, 424242), (2, 424243), (3, 424244);

------------------------------------------------------------------------------------------------
-- Comments on the remaining kinds of object
------------------------------------------------------------------------------------------------
COMMENT ON INDEX fid.events_pkey IS 'the primary key index';
COMMENT ON CONSTRAINT orders_qty_check ON fid.orders IS 'a column check';
COMMENT ON CONSTRAINT has_at ON DOMAIN fid.email IS 'a domain constraint';
COMMENT ON COLUMN fid.measurements_default.value IS 'a column of a partition';
COMMENT ON STATISTICS fid.events_stats IS 'extended statistics';
CREATE COLLATION fid.bytewise FROM "C";
COMMENT ON COLLATION fid.bytewise IS 'a copied collation';
CREATE TEXT SEARCH CONFIGURATION fid.plain_words (COPY = pg_catalog.simple);
COMMENT ON TEXT SEARCH CONFIGURATION fid.plain_words IS 'a text search configuration';

CREATE FUNCTION fid.ddl_noop() RETURNS event_trigger
    LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE EVENT TRIGGER fid_ddl_noop ON ddl_command_end EXECUTE FUNCTION fid.ddl_noop();
ALTER EVENT TRIGGER fid_ddl_noop DISABLE;
COMMENT ON EVENT TRIGGER fid_ddl_noop IS 'a disabled event trigger';

COMMIT;
