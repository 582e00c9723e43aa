mod passive_client;
mod welcome;
