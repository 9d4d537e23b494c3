--
-- PostgreSQL database dump
--

\restrict hqAIH8cmSSuUoVhCCCfIJjEryua6WNcko7KdaHkTdJb59ZnVJh33Fahb1cGeXbI

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: item; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.item (
    id integer NOT NULL,
    label text
);


--
-- Name: note; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.note (
    body text
);


--
-- Data for Name: item; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.item (id, label) FROM stdin;
1	item 1
2	item 2
3	item 3
4	item 4
5	item 5
6	item 6
7	item 7
8	item 8
9	item 9
10	item 10
11	item 11
12	item 12
13	item 13
14	item 14
15	item 15
16	item 16
17	item 17
18	item 18
19	item 19
20	item 20
\.


--
-- Data for Name: note; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.note (body) FROM stdin;
line\nbreak
\\.
\.


--
-- Name: item item_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.item
    ADD CONSTRAINT item_pkey PRIMARY KEY (id);


--
-- PostgreSQL database dump complete
--

\unrestrict hqAIH8cmSSuUoVhCCCfIJjEryua6WNcko7KdaHkTdJb59ZnVJh33Fahb1cGeXbI

