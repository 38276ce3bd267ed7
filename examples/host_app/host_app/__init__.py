"""A host application that keeps reviews of evals_orm studies in its own table."""
