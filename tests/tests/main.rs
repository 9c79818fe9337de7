//! Integration tests: real binaries, real mutual TLS, real sled directories. One binary, files
//! numbered by area.

mod t01_rollback_loop;
mod t02_bad_input;
mod t03_mutual_tls;
mod t04_durability;
mod t05_cluster;
mod t06_membership;
mod t07_compose;
mod t08_plans;
mod t09_alertmanager;
mod t10_flags;
mod t11_app_metrics;
mod t12_packaging;
mod t13_catalogue;
mod t14_self_revert;
mod t15_host_diff;
mod t16_schema_version;
mod t17_migrations;
mod t18_migrate;
mod t19_sharded_rollback;
mod t20_code_release;
mod t21_snapshot_transfer;
mod t22_demo;
mod t23_five_members;
mod t24_webhook_throttles;
mod t25_skip_isolate_watch;
mod t26_retention;
mod t27_access;
mod t28_approvals;
mod t29_join;
mod t30_connection_bounds;
mod t31_hostile_agent;
mod t32_bad_files;
mod t33_cluster_version;
mod t34_audit_export;
mod t35_audit_retention;
