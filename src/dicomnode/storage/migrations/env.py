"""Alembic environment: runs against the engine the node passes in."""

from alembic import context

from dicomnode.storage.models import Base

engine = context.config.attributes["engine"]

def include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001, ANN201
    # Tables owned by libraries (APScheduler's job store, procrastinate) are theirs.
    return not (type_ == "table" and reflected and compare_to is None)


with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=include_object,
    )
    context.run_migrations()
