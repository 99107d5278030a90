-- Run once by the postgres image, on an empty data volume, as POSTGRES_USER (who owns them all):
-- one database per server, so each migrates its own schema.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
